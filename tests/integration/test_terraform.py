"""The Terraform of infra/terraform: every module formatted and valid, offline through the provider
mirror (`terraform init -plugin-dir`), and the storage module applied against a local S3 server
(moto's server mode on 127.0.0.1): the bucket it makes is private, encrypted, TLS-only, expires job
files and answers browsers (CORS); the app writes and reads through it; destroy removes it.

Skipped, with the reason, where terraform or the provider mirror is missing (ACESTEP_TF_PLUGIN_DIR,
else /opt/tf-plugins)."""

import io
import json
import os
import shutil
import subprocess
import uuid
from pathlib import Path

import boto3
import httpx
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError

from handler.storage import StorageError, storage_from_url

ROOT = Path(__file__).resolve().parents[2]
TERRAFORM = ROOT / "infra" / "terraform"
MODULES = sorted(p.relative_to(TERRAFORM).as_posix() for p in (TERRAFORM / "modules").iterdir() if p.is_dir()) + ["aws"]
PLUGIN_DIR = Path(os.environ.get("ACESTEP_TF_PLUGIN_DIR", "/opt/tf-plugins"))
BINARY = shutil.which("terraform")

pytestmark = [
    pytest.mark.skipif(BINARY is None, reason="terraform is not installed (https://developer.hashicorp.com/terraform/install)"),
    pytest.mark.skipif(not (PLUGIN_DIR / "registry.terraform.io" / "hashicorp" / "aws").is_dir(),
                       reason=f"no offline provider mirror with hashicorp/aws at {PLUGIN_DIR} (set ACESTEP_TF_PLUGIN_DIR)"),
]


def terraform(*args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "TF_IN_AUTOMATION": "1", "TF_INPUT": "0", "CHECKPOINT_DISABLE": "1",
           "TF_CLI_CONFIG_FILE": os.devnull}
    done = subprocess.run([BINARY, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"terraform {' '.join(args)} in {cwd}:\n{done.stdout}\n{done.stderr}"
    return done


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    """A copy of infra/terraform (init writes .terraform and lock files; the checkout stays clean)."""
    copy = tmp_path_factory.mktemp("tf") / "terraform"
    shutil.copytree(TERRAFORM, copy, ignore=shutil.ignore_patterns(".terraform", "*.tfstate*", ".terraform.lock.hcl"))
    return copy


def test_every_file_is_formatted():
    terraform("fmt", "-check", "-recursive", "-diff", cwd=TERRAFORM)


@pytest.mark.parametrize("module", MODULES)
def test_each_module_is_valid(tree, module):
    here = tree / module
    terraform("init", "-backend=false", f"-plugin-dir={PLUGIN_DIR}", cwd=here)
    result = json.loads(terraform("validate", "-json", cwd=here).stdout)
    assert result["valid"] is True, result["diagnostics"]
    assert not [d for d in result["diagnostics"] if d["severity"] == "warning"], result["diagnostics"]


def test_the_root_module_wires_every_module_and_gives_the_outputs_operators_need():
    text = (TERRAFORM / "aws" / "main.tf").read_text()
    for module in MODULES[:-1]:
        assert f'"../{module}"' in text, f"{module} is not used by the aws root module"
    outputs = (TERRAFORM / "aws" / "outputs.tf").read_text()
    for name in ("api_url", "bucket", "storage_url", "database_url", "worker_user"):
        assert f'output "{name}"' in outputs


STORAGE_ROOT = """
terraform {{
  required_providers {{
    aws = {{ source = "hashicorp/aws" }}
  }}
}}

provider "aws" {{
  region                      = "us-east-1"
  access_key                  = "testing"
  secret_key                  = "testing"
  s3_use_path_style           = true
  skip_credentials_validation = true
  skip_requesting_account_id  = true
  skip_metadata_api_check     = true
  skip_region_validation      = true
  max_retries                 = 1
  endpoints {{
    s3  = "{endpoint}"
    sts = "{endpoint}"
  }}
}}

variable "require_tls" {{
  type = bool
}}

module "storage" {{
  source               = "{module}"
  require_tls          = var.require_tls
  bucket_name          = "{bucket}"
  prefix               = "acestep/prod"
  output_expiry_days   = 3
  cors_allowed_origins = ["https://studio.example.com"]
  force_destroy        = true
}}

output "storage_url" {{
  value = module.storage.storage_url
}}

output "bucket" {{
  value = module.storage.bucket
}}
"""


def test_the_storage_module_makes_a_private_bucket_the_app_uses_and_destroy_removes_it(tmp_path, s3_endpoint):
    bucket = f"acestep-tf-{uuid.uuid4().hex[:10]}"
    root = tmp_path / "root"
    root.mkdir()
    (root / "main.tf").write_text(STORAGE_ROOT.format(endpoint=s3_endpoint, bucket=bucket,
                                                      module=(TERRAFORM / "modules" / "storage").as_posix()))
    terraform("init", "-backend=false", f"-plugin-dir={PLUGIN_DIR}", cwd=root)
    terraform("apply", "-auto-approve", "-var", "require_tls=true", cwd=root)
    outputs = json.loads(terraform("output", "-json", cwd=root).stdout)
    assert outputs["bucket"]["value"] == bucket
    assert outputs["storage_url"]["value"] == f"s3://{bucket}/acestep/prod"

    s3 = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1", config=Config(signature_version="s3v4"))
    block = s3.get_public_access_block(Bucket=bucket)["PublicAccessBlockConfiguration"]
    assert block == {"BlockPublicAcls": True, "IgnorePublicAcls": True, "BlockPublicPolicy": True, "RestrictPublicBuckets": True}
    encryption = s3.get_bucket_encryption(Bucket=bucket)["ServerSideEncryptionConfiguration"]["Rules"][0]
    assert encryption["ApplyServerSideEncryptionByDefault"]["SSEAlgorithm"] == "AES256"
    rules = {r["ID"]: r for r in s3.get_bucket_lifecycle_configuration(Bucket=bucket)["Rules"]}
    expire = rules["expire-job-files"]
    assert expire["Status"] == "Enabled" and expire["Expiration"]["Days"] == 3
    assert expire["Filter"]["Prefix"] == "acestep/prod/jobs/"  # job files only: LoRA adapters (loras/) stay
    cors = s3.get_bucket_cors(Bucket=bucket)["CORSRules"][0]
    assert cors["AllowedOrigins"] == ["https://studio.example.com"] and set(cors["AllowedMethods"]) == {"GET", "HEAD"}
    assert "Range" in cors["AllowedHeaders"] and "Content-Range" in cors["ExposeHeaders"]
    policy = json.loads(s3.get_bucket_policy(Bucket=bucket)["Policy"])
    deny = policy["Statement"][0]
    assert deny["Effect"] == "Deny" and deny["Condition"]["Bool"]["aws:SecureTransport"] == "false"
    assert s3.get_bucket_ownership_controls(Bucket=bucket)["OwnershipControls"]["Rules"][0]["ObjectOwnership"] == "BucketOwnerEnforced"
    # The local server speaks plain HTTP, so the TLS-only policy refuses the app, as it would on AWS.
    storage = storage_from_url(outputs["storage_url"]["value"], secret=b"s" * 32, endpoint_url=s3_endpoint)
    with pytest.raises(StorageError, match="403"):
        storage.put("jobs/j0/output-0.mp3", io.BytesIO(b"x"), "audio/mpeg")

    terraform("apply", "-auto-approve", "-var", "require_tls=false", cwd=root)  # for this plain-HTTP server only
    with pytest.raises(ClientError):
        s3.get_bucket_policy(Bucket=bucket)

    # The app, configured with the module's output, writes, reads, links and lists under the prefix.
    audio = os.urandom(4096)
    storage.put("jobs/j1/output-0.mp3", io.BytesIO(audio), "audio/mpeg")
    assert storage.open("jobs/j1/output-0.mp3").read() == audio
    assert storage.open_range("jobs/j1/output-0.mp3", 100, 199).read() == audio[100:200]
    linked = httpx.get(storage.url("jobs/j1/output-0.mp3", 600), timeout=10)
    assert linked.status_code == 200 and linked.content == audio
    assert [k for k, _ in storage.list_keys("jobs/")] == ["jobs/j1/output-0.mp3"]
    assert [o["Key"] for o in s3.list_objects_v2(Bucket=bucket)["Contents"]] == ["acestep/prod/jobs/j1/output-0.mp3"]

    terraform("destroy", "-auto-approve", "-var", "require_tls=false", cwd=root)
    with pytest.raises(ClientError) as gone:
        s3.head_bucket(Bucket=bucket)
    assert gone.value.response["Error"]["Code"] in ("404", "NoSuchBucket")
