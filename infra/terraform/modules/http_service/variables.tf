variable "name" {
  description = "A name for the service's resources (e.g. acestep-prod)."
  type        = string
}

variable "image" {
  description = "The HTTP image (infra/docker/http.Dockerfile), pushed to a registry the tasks can pull from (ECR), by tag or digest."
  type        = string
}

variable "vpc_id" {
  description = "The VPC of the load balancer and the tasks."
  type        = string
}

variable "public_subnet_ids" {
  description = "Two or more public subnets for the load balancer."
  type        = list(string)
}

variable "service_subnet_ids" {
  description = "Subnets for the tasks (private with a NAT or VPC endpoints for ECR, Secrets Manager, S3 and logs; or public with assign_public_ip)."
  type        = list(string)
}

variable "assign_public_ip" {
  description = "Give tasks public addresses (public service subnets without a NAT)."
  type        = bool
  default     = false
}

variable "storage_url" {
  description = "ACESTEP_STORAGE_URL (the storage module's storage_url)."
  type        = string
}

variable "database_url_secret_arn" {
  description = "The Secrets Manager secret with ACESTEP_DATABASE_URL (the database module's)."
  type        = string
}

variable "secret_key_secret_arn" {
  description = "The Secrets Manager secret with ACESTEP_SECRET_KEY (shared with every worker)."
  type        = string
}

variable "environment" {
  description = "More ACESTEP_* settings for the API (README's configuration), e.g. ACESTEP_CORS_ORIGINS."
  type        = map(string)
  default     = {}
}

variable "desired_count" {
  description = "API tasks (stateless; two for a rolling deploy without a gap)."
  type        = number
  default     = 2
}

variable "cpu" {
  description = "Fargate CPU units per task."
  type        = number
  default     = 512
}

variable "memory" {
  description = "Fargate memory (MiB) per task."
  type        = number
  default     = 1024
}

variable "certificate_arn" {
  description = "An ACM certificate for HTTPS on 443 (then port 80 redirects to it); null: plain HTTP on 80."
  type        = string
  default     = null
}

variable "allowed_cidr_blocks" {
  description = "Who may reach the load balancer."
  type        = list(string)
  default     = ["0.0.0.0/0"]
}

variable "log_retention_days" {
  description = "CloudWatch retention of the API's JSON logs."
  type        = number
  default     = 30
}

variable "tags" {
  description = "Tags for every resource."
  type        = map(string)
  default     = {}
}
