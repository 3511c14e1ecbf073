# Least privilege for whatever touches the audio: read, write and delete objects under the project's
# prefix, list only that prefix, nothing else in the bucket and no bucket settings. The HTTP function
# needs the same set as the workers (uploads in, presigned links out, retention deletes).

data "aws_iam_policy_document" "storage" {
  statement {
    sid       = "ObjectsUnderThePrefix"
    effect    = "Allow"
    actions   = ["s3:GetObject", "s3:PutObject", "s3:DeleteObject", "s3:AbortMultipartUpload"]
    resources = ["${var.bucket_arn}/${var.prefix}*"]
  }

  statement {
    sid       = "ListThePrefixOnly"
    effect    = "Allow"
    actions   = ["s3:ListBucket"]
    resources = [var.bucket_arn]
    condition {
      test     = "StringLike"
      variable = "s3:prefix"
      values   = [var.prefix, "${var.prefix}*"]
    }
  }

  dynamic "statement" {
    for_each = var.kms_key_arn == null ? [] : [var.kms_key_arn]
    content {
      sid       = "TheBucketKey"
      effect    = "Allow"
      actions   = ["kms:Decrypt", "kms:GenerateDataKey"]
      resources = [statement.value]
    }
  }
}

resource "aws_iam_policy" "storage" {
  name        = "${var.name}-storage"
  description = "Read, write and delete the ACE-Step audio under ${var.prefix} only."
  policy      = data.aws_iam_policy_document.storage.json
  tags        = var.tags
}

resource "aws_iam_role_policy_attachment" "roles" {
  for_each   = toset(var.role_names)
  role       = each.value
  policy_arn = aws_iam_policy.storage.arn
}

resource "aws_iam_user" "workers" {
  count = var.create_worker_user ? 1 : 0
  name  = "${var.name}-workers"
  tags  = var.tags
}

resource "aws_iam_user_policy_attachment" "workers" {
  count      = var.create_worker_user ? 1 : 0
  user       = aws_iam_user.workers[0].name
  policy_arn = aws_iam_policy.storage.arn
}
