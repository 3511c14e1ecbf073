output "api_url" {
  description = "The API's base URL."
  value       = module.http.api_url
}

output "bucket" {
  description = "The audio bucket."
  value       = module.storage.bucket
}

output "storage_url" {
  description = "ACESTEP_STORAGE_URL for the GPU workers."
  value       = module.storage.storage_url
}

output "worker_user" {
  description = "The IAM user for GPU workers outside AWS: make its key with `aws iam create-access-key --user-name <this>`."
  value       = module.access.worker_user
}

output "database_url" {
  description = "ACESTEP_DATABASE_URL for the GPU workers and `migrate` (`terraform output -raw database_url`)."
  value       = module.database.database_url
  sensitive   = true
}

output "migrate_command" {
  description = "Run once per release, before the new image serves."
  value       = "aws ecs run-task --cluster ${module.http.cluster} --task-definition ${module.http.task_definition_arn} --launch-type FARGATE --network-configuration 'awsvpcConfiguration={subnets=[${join(",", var.private_subnet_ids)}],securityGroups=[${module.http.service_security_group_id}]}' --overrides '{\"containerOverrides\":[{\"name\":\"api\",\"command\":[\"migrate\"]}]}'"
}
