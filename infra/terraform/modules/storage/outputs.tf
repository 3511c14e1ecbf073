output "bucket" {
  description = "The bucket's name."
  value       = aws_s3_bucket.audio.id
}

output "bucket_arn" {
  description = "The bucket's ARN."
  value       = aws_s3_bucket.audio.arn
}

output "prefix" {
  description = "The project's folder in the bucket, with a trailing '/'."
  value       = local.prefix
}

output "storage_url" {
  description = "ACESTEP_STORAGE_URL for the HTTP function and every worker."
  value       = "s3://${aws_s3_bucket.audio.id}/${trimsuffix(local.prefix, "/")}"
}

output "region" {
  description = "The bucket's region (ACESTEP_S3_REGION / AWS_REGION for workers outside AWS)."
  value       = aws_s3_bucket.audio.region
}
