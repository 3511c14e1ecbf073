variable "bucket_name" {
  description = "The S3 bucket that holds the audio (outputs, uploaded sources, LoRA adapters)."
  type        = string
}

variable "prefix" {
  description = "The project's folder in the bucket (ACESTEP_STORAGE_URL=s3://BUCKET/PREFIX); every key the app writes is under it."
  type        = string
  default     = "acestep"

  validation {
    condition     = can(regex("^[A-Za-z0-9][A-Za-z0-9._/-]*[A-Za-z0-9]$", var.prefix)) && !strcontains(var.prefix, "//")
    error_message = "prefix: letters, digits, '.', '_', '-' and single '/' between them, with no leading or trailing '/'."
  }
}

variable "output_expiry_days" {
  description = "Delete a job's files (PREFIX/jobs/...: outputs and uploaded sources) this many days after they were written; 0 keeps them. LoRA adapters (PREFIX/loras/) never expire."
  type        = number
  default     = 14

  validation {
    condition     = var.output_expiry_days >= 0 && floor(var.output_expiry_days) == var.output_expiry_days
    error_message = "output_expiry_days: a whole number of days, 0 to keep files."
  }
}

variable "cors_allowed_origins" {
  description = "Web origins whose pages may play and seek the audio through presigned URLs (GET/HEAD with Range); empty: no CORS rule."
  type        = list(string)
  default     = []
}

variable "kms_key_arn" {
  description = "A KMS key for server-side encryption; null: SSE-S3 (AES-256, no key to manage)."
  type        = string
  default     = null
}

variable "require_tls" {
  description = "A bucket policy that refuses any request not made over TLS (keep it on; off only for a local S3 server on plain HTTP)."
  type        = bool
  default     = true
}

variable "force_destroy" {
  description = "Let `terraform destroy` delete the bucket with its objects in it."
  type        = bool
  default     = false
}

variable "tags" {
  description = "Tags for every resource."
  type        = map(string)
  default     = {}
}
