variable "name" {
  description = "A name for the IAM policy and user (e.g. acestep-prod)."
  type        = string
}

variable "bucket_arn" {
  description = "The audio bucket (the storage module's bucket_arn)."
  type        = string
}

variable "prefix" {
  description = "The project's folder in the bucket, with a trailing '/' (the storage module's prefix): nothing outside it is reachable."
  type        = string

  validation {
    condition     = endswith(var.prefix, "/") && length(var.prefix) > 1
    error_message = "prefix must end with '/' and name a folder (the storage module's prefix output)."
  }
}

variable "kms_key_arn" {
  description = "The bucket's KMS key, when it has one (its objects need kms:Decrypt/GenerateDataKey)."
  type        = string
  default     = null
}

variable "role_names" {
  description = "IAM roles to grant the access (e.g. the HTTP service's task role, GPU workers running on AWS)."
  type        = list(string)
  default     = []
}

variable "create_worker_user" {
  description = "Also make an IAM user with the access, for GPU workers outside AWS (RunPod, Modal). Its access key is made outside Terraform (`aws iam create-access-key`) so that no secret lands in the state."
  type        = bool
  default     = true
}

variable "tags" {
  description = "Tags for every resource."
  type        = map(string)
  default     = {}
}
