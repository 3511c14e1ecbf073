variable "name" {
  description = "The deployment's name: a prefix of every resource (lowercase, e.g. acestep-prod)."
  type        = string
  validation {
    condition     = can(regex("^[a-z][a-z0-9-]{2,20}$", var.name))
    error_message = "name: 3-21 lowercase letters, digits and '-', starting with a letter."
  }
}

variable "region" {
  description = "The AWS region."
  type        = string
  default     = "us-east-1"
}

variable "image" {
  description = "The HTTP image (infra/docker/http.Dockerfile) in ECR, e.g. 123456789012.dkr.ecr.us-east-1.amazonaws.com/acestep-http:0.1.0."
  type        = string
}

variable "vpc_id" {
  description = "The VPC."
  type        = string
}

variable "public_subnet_ids" {
  description = "Public subnets (two zones) for the load balancer."
  type        = list(string)
}

variable "private_subnet_ids" {
  description = "Private subnets (two zones, with a NAT) for the API tasks and the RDS instance."
  type        = list(string)
}

variable "bucket_name" {
  description = "The audio bucket to make (globally unique)."
  type        = string
}

variable "storage_prefix" {
  description = "The project's folder in the bucket."
  type        = string
  default     = "acestep"
}

variable "output_expiry_days" {
  description = "Days before a job's files expire in the bucket (0: never). Match ACESTEP_RETENTION_SECONDS."
  type        = number
  default     = 14
}

variable "cors_allowed_origins" {
  description = "Web origins allowed to play the audio from the bucket (browser UIs, the DAW's web view)."
  type        = list(string)
  default     = []
}

variable "database_url" {
  description = "An existing Postgres instead of RDS (null: make RDS)."
  type        = string
  default     = null
  sensitive   = true
}

variable "database_password" {
  description = "The RDS master password (16+ characters) when RDS is made."
  type        = string
  default     = null
  sensitive   = true
}

variable "database_public" {
  description = "Give RDS a public address for GPU workers outside AWS (RunPod, Modal), reachable from database_allowed_cidrs with TLS."
  type        = bool
  default     = false
}

variable "database_allowed_cidrs" {
  description = "Address ranges of GPU workers outside AWS allowed to reach RDS (with database_public)."
  type        = list(string)
  default     = []
}

variable "secret_key" {
  description = "ACESTEP_SECRET_KEY, shared by the API and every worker (32+ characters; e.g. `openssl rand -hex 32`)."
  type        = string
  sensitive   = true
  validation {
    condition     = length(var.secret_key) >= 32
    error_message = "secret_key: at least 32 characters."
  }
}

variable "api_environment" {
  description = "More ACESTEP_* settings for the API tasks."
  type        = map(string)
  default     = {}
}

variable "api_desired_count" {
  description = "API tasks."
  type        = number
  default     = 2
}

variable "certificate_arn" {
  description = "An ACM certificate for HTTPS (null: HTTP only, for a trial)."
  type        = string
  default     = null
}
