"""The RPM packages, built for real: rpmbuild, rpmlint, rpm --root, systemd-analyze.

One session fixture builds every package once (scripts/build-rpm.sh, the same
script `make rpm` runs) and installs them into a scratch root with
`rpm --root ROOT --nodeps -ivh`. The installed commands are then run straight
from that root: their `#!/usr/bin/python3` line picks the system Python, and
PYTHONPATH puts the root's site-packages first and the venv's after it for the
dependencies (a chroot would need a whole Python inside the root). A missing
tool fails these tests; it never skips them.
"""

from __future__ import annotations

import gzip
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

import qvaudio

REPO = Path(__file__).resolve().parent.parent
SPEC = REPO / "rpm" / "qvaudio.spec"
RPMLINTRC = REPO / "rpm" / "qvaudio.rpmlintrc"
VERSION = qvaudio.__version__
PACKAGES = ("python3-qvaudio", "qvaudio-common", "qvaudio-dom0", "qvaudio-guest")


def need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.fail(f"{tool} is not installed (scripts/install-deps.sh installs it)")
    return path


def run(
    args: list[str],
    *,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    timeout: float = 60,
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        args, capture_output=True, text=True, env=env, cwd=cwd, timeout=timeout, check=False
    )


def ok(args: list[str], *, env: dict[str, str] | None = None, cwd: Path | None = None) -> str:
    proc = run(args, env=env, cwd=cwd)
    assert proc.returncode == 0, f"{args} exited {proc.returncode}:\n{proc.stdout}{proc.stderr}"
    return proc.stdout


@dataclass(frozen=True)
class Build:
    rpms: dict[str, Path]
    srpm: Path
    root: Path
    install_stderr: str

    def site(self) -> Path:
        found = list(self.root.glob("usr/lib/python3*/site-packages"))
        assert len(found) == 1, found
        return found[0]

    def env(self, **extra: str) -> dict[str, str]:
        venv_site = sysconfig.get_path("purelib")
        env = {k: v for k, v in os.environ.items() if not k.startswith("QVAUDIO_")}
        env["PYTHONPATH"] = f"{self.site()}:{venv_site}"
        env.update(extra)
        return env


@pytest.fixture(scope="session")
def build(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Build]:
    for tool in ("rpmbuild", "rpm", "git", "tar"):
        need(tool)
    work = tmp_path_factory.mktemp("rpm")
    out = work / "out"
    env = dict(os.environ, RPM_TOPDIR=str(work / "topdir"), PYTHON=sys.executable)
    proc = run([str(REPO / "scripts" / "build-rpm.sh"), str(out)], env=env, timeout=120)
    assert proc.returncode == 0, f"build-rpm.sh failed:\n{proc.stdout[-4000:]}{proc.stderr[-4000:]}"
    rpms = {p: out / f"{p}-{VERSION}-1.noarch.rpm" for p in PACKAGES}
    for path in rpms.values():
        assert path.is_file(), f"{path.name} was not built; got {sorted(os.listdir(out))}"
    srpm = out / f"qvaudio-{VERSION}-1.src.rpm"
    assert srpm.is_file()

    root = work / "root"
    root.mkdir()
    install = run(["rpm", "--root", str(root), "--nodeps", "-ivh", *map(str, rpms.values())])
    assert install.returncode == 0, install.stdout + install.stderr
    yield Build(rpms, srpm, root, install.stderr)


def test_spec_version_is_the_package_version() -> None:
    spec = SPEC.read_text()
    assert re.search(rf"^Version:\s+{re.escape(VERSION)}$", spec, re.M), "bump rpm/qvaudio.spec"


def test_rpmlint_finds_no_errors_or_unlisted_warnings(build: Build) -> None:
    need("rpmlint")
    files = [*map(str, build.rpms.values()), str(build.srpm), str(SPEC)]
    proc = run(["rpmlint", "-r", str(RPMLINTRC), *files])
    summary = re.search(r"(\d+) errors, (\d+) warnings", proc.stdout)
    assert summary, proc.stdout + proc.stderr
    # Every accepted finding is filtered, with its reason, in qvaudio.rpmlintrc.
    assert summary.groups() == ("0", "0"), proc.stdout
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_rpmlint_filters_each_match_a_real_finding(build: Build) -> None:
    # Unfiltered, the accepted findings are there, and every filter still
    # matches one of them: no stale or blanket filter hides a new problem.
    files = [*map(str, build.rpms.values()), str(build.srpm), str(SPEC)]
    findings = [
        line
        for line in run(["rpmlint", *files]).stdout.splitlines()
        if re.search(r": [EW]: ", line)
    ]
    assert any(": E: " in line for line in findings)
    filters = re.findall(r'^addFilter\(r"(.*)"\)$', RPMLINTRC.read_text(), re.M)
    assert len(filters) >= 10
    for pattern in filters:
        assert any(re.search(pattern, line) for line in findings), f"unused filter {pattern}"


def files_of(rpm: Path) -> set[str]:
    return set(ok(["rpm", "-qlp", str(rpm)]).split())


def config_of(rpm: Path) -> set[str]:
    return set(ok(["rpm", "-qcp", str(rpm)]).split())


def test_file_lists(build: Build) -> None:
    lib = files_of(build.rpms["python3-qvaudio"])
    assert any(re.fullmatch(r"/usr/lib/python3\.\d+/site-packages/qvaudio/cli\.py", f) for f in lib)
    assert any(f.endswith(f"/qvaudio-{VERSION}.dist-info/entry_points.txt") for f in lib)
    assert any(f.endswith("/qvaudio/decl/libxenvchan.h") for f in lib)
    # Every folder of the package, each module in it (a subpackage left out of
    # the wheel would install an agent that cannot start).
    for module in sorted((REPO / "qvaudio").rglob("*.py")):
        path = module.relative_to(REPO).as_posix()
        assert any(f.endswith(f"/site-packages/{path}") for f in lib), f"{path} not packaged"
    assert not any(f.startswith(("/etc", "/usr/bin")) for f in lib)

    common = files_of(build.rpms["qvaudio-common"])
    assert "/etc/qvaudio/qvaudio.yaml" in common

    dom0 = files_of(build.rpms["qvaudio-dom0"])
    assert {
        "/usr/bin/qvaudio",
        "/usr/bin/qvaudio-dom0",
        "/etc/qvaudio/policy.d",
        "/etc/qvaudio/policy.d/90-default.yaml",
        "/usr/lib/systemd/user/qvaudio-dom0.service",
        "/usr/lib/systemd/user-preset/80-qvaudio-dom0.preset",
        "/usr/share/man/man1/qvaudio.1.gz",
        "/usr/share/man/man1/qvaudio-dom0.1.gz",
    } <= dom0
    shipped_policy = {f"/etc/qvaudio/policy.d/{p.name}" for p in (REPO / "policy").glob("*.yaml")}
    assert shipped_policy <= dom0

    guest = files_of(build.rpms["qvaudio-guest"])
    assert {
        "/usr/bin/qvaudio-guest",
        "/usr/lib/systemd/user/qvaudio-guest.service",
        "/usr/lib/systemd/user-preset/80-qvaudio-guest.preset",
        "/usr/share/man/man1/qvaudio-guest.1.gz",
    } <= guest

    # Only qvaudio-common owns qvaudio.yaml, so dom0 and guest install side by side.
    owners = [p for p, rpm in build.rpms.items() if "/etc/qvaudio/qvaudio.yaml" in files_of(rpm)]
    assert owners == ["qvaudio-common"]


def test_config_and_policy_are_noreplace_config(build: Build) -> None:
    assert config_of(build.rpms["qvaudio-common"]) == {"/etc/qvaudio/qvaudio.yaml"}
    assert config_of(build.rpms["qvaudio-dom0"]) == {"/etc/qvaudio/policy.d/90-default.yaml"}
    for pkg in ("python3-qvaudio", "qvaudio-guest"):
        assert config_of(build.rpms[pkg]) == set()
    for pkg in ("qvaudio-common", "qvaudio-dom0"):
        flags = ok(
            ["rpm", "-qp", "--qf", "[%{FILENAMES} %{FILEFLAGS:fflags}\n]", str(build.rpms[pkg])]
        )
        for line in flags.splitlines():
            name, _, fflags = line.partition(" ")
            if name.endswith(".yaml"):
                assert "c" in fflags and "n" in fflags, line  # %config(noreplace)


def test_requires(build: Build) -> None:
    def requires(pkg: str) -> str:
        return ok(["rpm", "-qpR", str(build.rpms[pkg])])

    lib = requires("python3-qvaudio")
    for dep in ("xen-libs", "pulseaudio-libs"):
        assert re.search(rf"^{dep}$", lib, re.M), lib
    for dist in ("cffi", "pulsectl", "pyxs", "pyyaml"):
        assert re.search(rf"^python3(\.\d+)?dist\({dist}\) >= ", lib, re.M), lib
    dom0 = requires("qvaudio-dom0")
    assert re.search(r"^python3(\.\d+)?dist\(numpy\) >= 1\.24", dom0, re.M), dom0
    for pkg in ("qvaudio-dom0", "qvaudio-guest"):
        reqs = requires(pkg)
        assert f"python3-qvaudio = {VERSION}-1" in reqs
        assert f"qvaudio-common = {VERSION}-1" in reqs


def test_scratch_install_layout(build: Build) -> None:
    # rpm ran %post in the root, where there is no /bin/sh: that and nothing else.
    complaints = [
        line
        for line in build.install_stderr.splitlines()
        if "error" in line.lower() or "warning" in line.lower()
    ]
    for line in complaints:
        assert "scriptlet interpreter /bin/sh" in line or "%post(" in line, line
    for name in ("qvaudio", "qvaudio-dom0", "qvaudio-guest"):
        script = build.root / "usr" / "bin" / name
        assert os.access(script, os.X_OK)
        assert script.read_text().startswith("#!/usr/bin/python3\n")
    yaml = build.root / "etc" / "qvaudio" / "qvaudio.yaml"
    assert yaml.read_bytes() == (REPO / "qvaudio.yaml").read_bytes()
    assert (build.root / "etc/qvaudio/policy.d").stat().st_mode & 0o022 == 0


def test_installed_man_pages(build: Build) -> None:
    man1 = build.root / "usr/share/man/man1"
    for name in ("qvaudio", "qvaudio-dom0", "qvaudio-guest"):
        text = gzip.decompress((man1 / f"{name}.1.gz").read_bytes()).decode()
        assert text.startswith(f'.TH "{name.upper()}" "1" ')
        assert "\\-\\-help" in text
        # Generated from the installed package: installed defaults, never the
        # build machine's checkout or build root.
        assert "/etc/qvaudio/qvaudio.yaml" in text.replace("\\-", "-")
        assert str(REPO) not in text and "BUILDROOT" not in text


def test_installed_package_is_the_one_imported(build: Build) -> None:
    # From the root, not the checkout: `python -c` puts the working directory first.
    out = ok(
        ["/usr/bin/python3", "-c", "import qvaudio; print(qvaudio.__file__)"],
        env=build.env(),
        cwd=build.root,
    )
    assert out.strip().startswith(str(build.site())), out


def test_installed_commands_run(build: Build) -> None:
    bin_dir = build.root / "usr" / "bin"
    env = build.env()
    assert ok([str(bin_dir / "qvaudio"), "--version"], env=env).strip() == f"qvaudio {VERSION}"
    assert (
        ok([str(bin_dir / "qvaudio-dom0"), "--version"], env=env).strip()
        == f"qvaudio-dom0 {VERSION}"
    )
    assert "--transport" in ok([str(bin_dir / "qvaudio-guest"), "--help"], env=env)


def test_installed_policy_and_config_check(build: Build, tmp_path: Path) -> None:
    qvaudio_cmd = str(build.root / "usr" / "bin" / "qvaudio")
    policy_dir = build.root / "etc" / "qvaudio" / "policy.d"
    out = ok([qvaudio_cmd, "policy", "check", str(policy_dir)], env=build.env())
    assert re.fullmatch(r"OK: 1 files, 1 rules\n", out), out
    # The same check through the default location, as the agent finds it.
    out = ok([qvaudio_cmd, "policy", "check"], env=build.env(QVAUDIO_POLICY_DIR=str(policy_dir)))
    assert out.startswith("OK: ")
    config = build.root / "etc" / "qvaudio" / "qvaudio.yaml"
    out = ok([qvaudio_cmd, "config", "check"], env=build.env(QVAUDIO_CONFIG=str(config)))
    assert out.strip() == f"{config}: OK"
    # And a broken policy is a failure with file:line, not an OK.
    broken = tmp_path / "policy.d"
    broken.mkdir(mode=0o755)
    (broken / "10-bad.yaml").write_text("rules:\n  - vm: work\n    playback: maybe\n")
    proc = run([qvaudio_cmd, "policy", "check", str(broken)], env=build.env())
    assert proc.returncode == 1
    assert "10-bad.yaml:3" in proc.stderr, proc.stderr


def test_upgrade_keeps_edited_config(build: Build, tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    common = str(build.rpms["qvaudio-common"])
    ok(["rpm", "--root", str(root), "--nodeps", "-i", common])
    config = root / "etc" / "qvaudio" / "qvaudio.yaml"
    edited = config.read_text() + "# edited by the user\n"
    config.write_text(edited)
    ok(["rpm", "--root", str(root), "--nodeps", "-U", "--replacepkgs", common])
    assert config.read_text() == edited
    verify = run(["rpm", "--root", str(root), "-V", "qvaudio-common"])
    assert re.search(r"^S\.5.* c /etc/qvaudio/qvaudio\.yaml$", verify.stdout, re.M), verify.stdout


def scriptlets(rpm: Path) -> dict[str, str]:
    text = ok(["rpm", "-qp", "--scripts", str(rpm)])
    parts = re.split(r"^(\w+) scriptlet \(using /bin/sh\):\n", text, flags=re.M)
    return dict(zip(parts[1::2], parts[2::2], strict=True))


@pytest.mark.parametrize("agent", ["guest", "dom0"])
def test_scriptlets_apply_the_preset_and_tolerate_no_systemctl(
    build: Build, agent: str, tmp_path: Path
) -> None:
    scripts = scriptlets(build.rpms[f"qvaudio-{agent}"])
    assert {"postinstall", "preuninstall"} <= scripts.keys()
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    log = tmp_path / "systemctl.log"
    systemctl = fake_bin / "systemctl"
    systemctl.write_text(f'#!/bin/sh\necho "$@" >> {log}\n')
    systemctl.chmod(0o755)
    unit = f"qvaudio-{agent}.service"
    for phase, arg in (("postinstall", "1"), ("postinstall", "2"), ("preuninstall", "0")):
        body = scripts[phase]
        # Where systemctl is missing (a chroot, this scratch root) it does nothing.
        proc = run(["/bin/sh", "-c", body, "sh", arg], env={"PATH": "/nonexistent"})
        assert proc.returncode == 0, proc.stderr
        proc = run(["/bin/sh", "-c", body, "sh", arg], env={"PATH": f"{fake_bin}:/usr/bin:/bin"})
        assert proc.returncode == 0, proc.stderr
    calls = log.read_text().splitlines()
    # Install applies the preset once (not on upgrade), erase disables: for every user.
    assert any("--global preset" in c and c.endswith(unit) for c in calls), calls
    assert any("--global disable" in c and c.endswith(unit) for c in calls), calls
    assert len(calls) == 2, calls
    preset = build.root / "usr/lib/systemd/user-preset" / f"80-qvaudio-{agent}.preset"
    assert f"enable {unit}" in preset.read_text().splitlines()


def verify_units(
    build: Build, units: list[Path], tmp_path: Path
) -> subprocess.CompletedProcess[str]:
    """`systemd-analyze --user verify` as if the packages were installed on this machine.

    verify checks that ExecStart= exists on the host and that man: pages named in
    Documentation= open, so in a private mount namespace the root's /usr/bin is
    overlaid on the host's and MANPATH points at the root's man pages.
    """
    need("systemd-analyze")
    need("unshare")
    runtime = tmp_path / "runtime"
    runtime.mkdir(mode=0o700, exist_ok=True)
    env = dict(os.environ, XDG_RUNTIME_DIR=str(runtime), MANPATH=str(build.root / "usr/share/man"))
    overlay = f"lowerdir={build.root}/usr/bin:/usr/bin"
    script = (
        f'mount -t overlay overlay -o "{overlay}" /usr/bin && '
        'exec systemd-analyze --user verify --man=yes --generators=no "$@"'
    )
    # Unprivileged, a user namespace gives the mount namespace (kernel >= 5.11 for overlay).
    unshare = ["unshare", "--mount"] if os.geteuid() == 0 else ["unshare", "-r", "--mount"]
    return run([*unshare, "/bin/sh", "-c", script, "sh", *map(str, units)], env=env)


def test_installed_units_verify_clean(build: Build, tmp_path: Path) -> None:
    unit_dir = build.root / "usr/lib/systemd/user"
    units = sorted(unit_dir.glob("qvaudio-*.service"))
    assert [u.name for u in units] == ["qvaudio-dom0.service", "qvaudio-guest.service"]
    proc = verify_units(build, units, tmp_path)
    # verify exits 0 on unknown keys and bad values, printing them: both must be empty.
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == "" and proc.stdout == "", proc.stdout + proc.stderr


def test_unit_verification_catches_mistakes(build: Build, tmp_path: Path) -> None:
    good = (build.root / "usr/lib/systemd/user/qvaudio-guest.service").read_text()
    bad = tmp_path / "qvaudio-bad.service"
    bad.write_text(good.replace("Type=notify", "Type=notfy").replace("qvaudio-guest(1)", "nope(1)"))
    proc = verify_units(build, [bad], tmp_path)
    assert "notfy" in proc.stderr
    assert "nope(1)" in proc.stderr


def test_units_say_what_the_agents_do() -> None:
    for agent in ("guest", "dom0"):
        text = (REPO / "systemd" / f"qvaudio-{agent}.service").read_text()
        lines = set(text.splitlines())
        for needed in (
            "Type=notify",  # both agents send READY=1 (qvaudio/common/sdnotify.py)
            "Restart=on-failure",
            "ConditionUser=!root",
            "PartOf=graphical-session.target",
            "WantedBy=graphical-session.target",
            "NoNewPrivileges=yes",
            f"ExecStart=/usr/bin/qvaudio-{agent}",
        ):
            assert needed in lines, f"qvaudio-{agent}.service lacks {needed}"
        assert any(line.startswith("After=") and "pipewire-pulse.service" in line for line in lines)
        assert any(line.startswith("WatchdogSec=") for line in lines)


@pytest.mark.parametrize(
    ("defines", "present", "absent"),
    [
        (
            ["fedora 40"],
            ["%pyproject_wheel", "%pyproject_install", "%pyproject_save_files qvaudio"],
            ["pip wheel", "pip install", "BuildRequires:  python3-pip"],
        ),
        (
            [],
            ["-m pip wheel --no-deps --no-index", "--target", "BuildRequires:  python3-pip"],
            ["%pyproject_wheel", "%pyproject_install", "%generate_buildrequires"],
        ),
    ],
    ids=["fedora", "fallback"],
)
def test_spec_takes_the_right_branch(
    defines: list[str], present: list[str], absent: list[str]
) -> None:
    need("rpmspec")
    args = ["rpmspec", "-P", str(SPEC), "--define", f"build_python {sys.executable}"]
    for define in defines:
        args += ["--define", define]
    code = "\n".join(line for line in ok(args).splitlines() if not line.lstrip().startswith("#"))
    for needle in present:
        assert needle in code, needle
    for needle in absent:
        assert needle not in code, needle
