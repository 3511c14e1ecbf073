output "policy_arn" {
  description = "The storage policy (attach it to any other role that must read or write the audio)."
  value       = aws_iam_policy.storage.arn
}

output "policy_json" {
  description = "The policy document, for review."
  value       = data.aws_iam_policy_document.storage.json
}

output "worker_user" {
  description = "The IAM user for GPU workers outside AWS (null when not made): `aws iam create-access-key --user-name <this>`."
  value       = var.create_worker_user ? aws_iam_user.workers[0].name : null
}
