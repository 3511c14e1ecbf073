output "api_url" {
  description = "The API's base URL (clients use it in place of upstream's http://127.0.0.1:8001)."
  value       = "${var.certificate_arn == null ? "http" : "https"}://${aws_lb.api.dns_name}"
}

output "service_security_group_id" {
  description = "The tasks' security group (allow it into the database)."
  value       = aws_security_group.service.id
}

output "task_role_name" {
  description = "The tasks' IAM role (the storage policy is attached to it)."
  value       = aws_iam_role.task.name
}

output "cluster" {
  description = "The ECS cluster (for `aws ecs run-task ... migrate`)."
  value       = aws_ecs_cluster.api.name
}

output "task_definition_arn" {
  description = "The API's task definition (run it with command [\"migrate\"] once per release)."
  value       = aws_ecs_task_definition.api.arn
}
