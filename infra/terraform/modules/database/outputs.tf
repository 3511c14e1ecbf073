output "database_url" {
  description = "ACESTEP_DATABASE_URL (for workers outside AWS and for `acestep-serverless migrate`)."
  value       = local.url
  sensitive   = true
}

output "database_url_secret_arn" {
  description = "The Secrets Manager secret holding the URL."
  value       = aws_secretsmanager_secret.database_url.arn
}

output "security_group_id" {
  description = "The RDS instance's security group (null for an external database)."
  value       = local.create ? aws_security_group.jobs[0].id : null
}
