# ACE-Step serverless on AWS, outside the GPUs: the audio bucket, the job database, the HTTP function
# (ECS Fargate behind a load balancer) and least-privilege access to the audio for the API and the GPU
# workers. The GPU workers themselves run on RunPod or Modal (infra/README.md) with the outputs below.

module "storage" {
  source               = "../modules/storage"
  bucket_name          = var.bucket_name
  prefix               = var.storage_prefix
  output_expiry_days   = var.output_expiry_days
  cors_allowed_origins = var.cors_allowed_origins
}

module "database" {
  source                     = "../modules/database"
  name                       = var.name
  database_url               = var.database_url
  password                   = var.database_password
  vpc_id                     = var.vpc_id
  subnet_ids                 = var.database_public ? var.public_subnet_ids : var.private_subnet_ids
  allowed_security_group_ids = [module.http.service_security_group_id]
  allowed_cidr_blocks        = var.database_allowed_cidrs
  publicly_accessible        = var.database_public
}

resource "aws_secretsmanager_secret" "secret_key" {
  name_prefix = "${var.name}-secret-key-"
  description = "ACESTEP_SECRET_KEY of the ACE-Step API and workers"
}

resource "aws_secretsmanager_secret_version" "secret_key" {
  secret_id     = aws_secretsmanager_secret.secret_key.id
  secret_string = var.secret_key
}

module "http" {
  source                  = "../modules/http_service"
  name                    = var.name
  image                   = var.image
  vpc_id                  = var.vpc_id
  public_subnet_ids       = var.public_subnet_ids
  service_subnet_ids      = var.private_subnet_ids
  storage_url             = module.storage.storage_url
  database_url_secret_arn = module.database.database_url_secret_arn
  secret_key_secret_arn   = aws_secretsmanager_secret.secret_key.arn
  environment             = var.api_environment
  desired_count           = var.api_desired_count
  certificate_arn         = var.certificate_arn
}

module "access" {
  source             = "../modules/worker_access"
  name               = var.name
  bucket_arn         = module.storage.bucket_arn
  prefix             = module.storage.prefix
  role_names         = [module.http.task_role_name]
  create_worker_user = true
}
