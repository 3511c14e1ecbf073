"""The HTTP function's image (infra/docker/http.Dockerfile) without a Docker engine (hadolint lints it
beside the worker's Dockerfile in test_worker_image.py), checked for what the image must be (pinned slim base, multi-stage, the API's pinned packages and no
torch, non-root, a health check, `acestep-serverless serve` as the default command, sources in the build
context). Its entry point and health check run for real in tests/integration/test_http_image_entrypoint.py."""

import json
import re

import pytest

from tests.unit.test_worker_image import (
    ROOT,
    _image_reference_is_pinned,
    build_context,
    expand,
    parse,
)

DOCKERFILE = ROOT / "infra" / "docker" / "http.Dockerfile"
API_LOCK = "infra/modal/requirements-api.lock"


@pytest.fixture(scope="module")
def dockerfile():
    return parse(DOCKERFILE.read_text())


def test_it_is_multi_stage_on_a_pinned_slim_python(dockerfile):
    global_args, stages = dockerfile
    assert len(stages) >= 2, "one stage: the build tools would ship in the image"
    names = {s.name for s in stages if s.name}
    for stage in stages:
        if stage.base in names:
            continue
        reference = expand(stage.base, global_args)
        assert _image_reference_is_pinned(reference), f"{reference} is not pinned to a version"
        assert re.fullmatch(r"python:3\.11\.\d+-slim-\w+", reference), f"{reference}: not a slim CPython 3.11 (the lock's)"


def test_it_installs_the_pinned_api_packages_and_never_torch(dockerfile):
    builder = dockerfile[1][0]
    copies = [i.words() for i in builder.all("COPY")]
    assert any(words[0] == API_LOCK for words in copies), "the API lock is not copied in"
    runs = " ".join(i.args for i in builder.all("RUN"))
    assert "pip install -r /tmp/requirements-api.lock" in runs
    assert re.search(r"pip install --no-deps /wheels/acestep_serverless-\*\.whl", runs), "the project must come without its (torch) dependencies"
    assert "'torch' in sys.modules" in runs, "the build checks that the API imports without torch"
    lock = (ROOT / API_LOCK).read_text().lower()
    for heavy in ("torch", "transformers", "diffusers", "peft", "vllm"):
        assert not re.search(rf"^{heavy}==", lock, re.M), f"{heavy} is in the API lock"
    final = dockerfile[1][-1]
    assert not final.all("RUN") or all("pip install" not in i.args for i in final.all("RUN"))


def test_it_runs_serve_as_a_non_root_user_with_an_http_health_check(dockerfile):
    stage = dockerfile[1][-1]
    keywords = [i.keyword for i in stage.instructions]
    users = [i for i in stage.instructions if i.keyword == "USER"]
    assert users and users[-1].args.split(":")[0] not in ("root", "0")
    assert keywords.index("USER") < keywords.index("ENTRYPOINT")
    health = stage.all("HEALTHCHECK")[0].args
    assert '["python", "-m", "handler.healthcheck", "--http"]' in health
    assert json.loads(stage.all("ENTRYPOINT")[0].args) == ["acestep-serverless"]
    assert json.loads(stage.all("CMD")[0].args) == ["serve"]
    env = " ".join(i.args for i in stage.all("ENV"))
    assert "ACESTEP_HOST=0.0.0.0" in env, "serve would listen on 127.0.0.1 only, unreachable from outside"
    port = re.search(r"ACESTEP_PORT=(\d+)", env).group(1)
    assert stage.all("EXPOSE")[0].args == port


def test_every_copied_source_is_in_the_build_context(dockerfile):
    context = build_context()
    copied = []
    for stage in dockerfile[1]:
        for inst in stage.all("COPY"):
            if any(w.startswith("--from") for w in inst.words()):
                continue
            copied += [w for w in inst.words() if not w.startswith("--")][:-1]
    assert API_LOCK in copied
    for source in copied:
        assert (ROOT / source).exists(), f"COPY {source}: no such file"
        assert any(f == source or f.startswith(source.rstrip("/") + "/") for f in context), \
            f"COPY {source}: .dockerignore leaves it out of the build context"
