variable "name" {
  description = "A name for the database's resources (e.g. acestep-prod)."
  type        = string
}

variable "database_url" {
  description = "An existing Postgres (14+) instead of RDS: postgresql://USER:PASSWORD@HOST:5432/DB?sslmode=require. Null: make an RDS instance."
  type        = string
  default     = null
  sensitive   = true
}

variable "vpc_id" {
  description = "The VPC of the RDS instance (only when one is made)."
  type        = string
  default     = null
}

variable "subnet_ids" {
  description = "At least two subnets in different zones for the RDS instance (only when one is made)."
  type        = list(string)
  default     = []
}

variable "allowed_security_group_ids" {
  description = "Security groups whose members may connect on 5432 (the HTTP service, workers on AWS)."
  type        = list(string)
  default     = []
}

variable "allowed_cidr_blocks" {
  description = "Address ranges that may connect on 5432 (workers outside AWS, with publicly_accessible); TLS is required either way."
  type        = list(string)
  default     = []
}

variable "publicly_accessible" {
  description = "Give the instance a public address (for GPU workers outside AWS: RunPod, Modal)."
  type        = bool
  default     = false
}

variable "password" {
  description = "The master password when an RDS instance is made (16+ characters; it is stored in the state and in the URL secret)."
  type        = string
  default     = null
  sensitive   = true
}

variable "instance_class" {
  description = "The RDS instance class: the job queue is small rows and short transactions."
  type        = string
  default     = "db.t4g.small"
}

variable "allocated_storage_gb" {
  description = "Storage in GB (it grows up to 5x on its own)."
  type        = number
  default     = 20
}

variable "engine_version" {
  description = "Postgres major version."
  type        = string
  default     = "15"
}

variable "multi_az" {
  description = "A standby in a second zone (no job is lost on a zone failure)."
  type        = bool
  default     = false
}

variable "deletion_protection" {
  description = "Refuse to delete the instance (turn off before a destroy)."
  type        = bool
  default     = true
}

variable "tags" {
  description = "Tags for every resource."
  type        = map(string)
  default     = {}
}
