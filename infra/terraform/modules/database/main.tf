# The job database: an RDS Postgres instance (encrypted, TLS enforced, backups, in the given subnets), or
# an existing database by URL. Either way the URL goes into a Secrets Manager secret that the HTTP
# service reads at start (ACESTEP_DATABASE_URL), so it appears in no task definition.

locals {
  create   = nonsensitive(var.database_url == null) # whether a URL was given is no secret
  username = "acestep"
  db_name  = "acestep"
}

resource "aws_db_subnet_group" "jobs" {
  count      = local.create ? 1 : 0
  name       = "${var.name}-jobs"
  subnet_ids = var.subnet_ids
  tags       = var.tags
}

resource "aws_security_group" "jobs" {
  count       = local.create ? 1 : 0
  name        = "${var.name}-jobs-db"
  description = "Postgres for the ACE-Step job queue"
  vpc_id      = var.vpc_id
  tags        = var.tags
}

resource "aws_vpc_security_group_ingress_rule" "from_groups" {
  for_each                     = local.create ? toset(var.allowed_security_group_ids) : toset([])
  security_group_id            = aws_security_group.jobs[0].id
  referenced_security_group_id = each.value
  ip_protocol                  = "tcp"
  from_port                    = 5432
  to_port                      = 5432
}

resource "aws_vpc_security_group_ingress_rule" "from_cidrs" {
  for_each          = local.create ? toset(var.allowed_cidr_blocks) : toset([])
  security_group_id = aws_security_group.jobs[0].id
  cidr_ipv4         = each.value
  ip_protocol       = "tcp"
  from_port         = 5432
  to_port           = 5432
}

resource "aws_db_parameter_group" "jobs" {
  count  = local.create ? 1 : 0
  name   = "${var.name}-jobs"
  family = "postgres${var.engine_version}"
  tags   = var.tags
  parameter {
    name  = "rds.force_ssl"
    value = "1"
  }
}

resource "aws_db_instance" "jobs" {
  count                      = local.create ? 1 : 0
  identifier                 = "${var.name}-jobs"
  engine                     = "postgres"
  engine_version             = var.engine_version
  instance_class             = var.instance_class
  allocated_storage          = var.allocated_storage_gb
  max_allocated_storage      = var.allocated_storage_gb * 5
  storage_encrypted          = true
  db_name                    = local.db_name
  username                   = local.username
  password                   = var.password
  db_subnet_group_name       = aws_db_subnet_group.jobs[0].name
  vpc_security_group_ids     = [aws_security_group.jobs[0].id]
  parameter_group_name       = aws_db_parameter_group.jobs[0].name
  publicly_accessible        = var.publicly_accessible
  multi_az                   = var.multi_az
  backup_retention_period    = 7
  deletion_protection        = var.deletion_protection
  skip_final_snapshot        = false
  final_snapshot_identifier  = "${var.name}-jobs-final"
  auto_minor_version_upgrade = true
  tags                       = var.tags

  lifecycle {
    precondition {
      condition     = var.password != null && length(coalesce(var.password, "")) >= 16
      error_message = "password: 16 characters or more are needed to make an RDS instance (or give database_url)."
    }
    precondition {
      condition     = length(var.subnet_ids) >= 2 && var.vpc_id != null
      error_message = "vpc_id and two or more subnet_ids are needed to make an RDS instance (or give database_url)."
    }
  }
}

locals {
  url = local.create ? format("postgresql://%s:%s@%s:%d/%s?sslmode=require", local.username, urlencode(coalesce(var.password, "-")),
  aws_db_instance.jobs[0].address, aws_db_instance.jobs[0].port, local.db_name) : var.database_url
}

resource "aws_secretsmanager_secret" "database_url" {
  name_prefix = "${var.name}-database-url-"
  description = "ACESTEP_DATABASE_URL of the ACE-Step job queue"
  tags        = var.tags
}

resource "aws_secretsmanager_secret_version" "database_url" {
  secret_id     = aws_secretsmanager_secret.database_url.id
  secret_string = local.url
}
