#!/usr/bin/env bash
# Build qvaudio's RPMs (rpm/qvaudio.spec) from the working tree into OUTDIR.
#
#   scripts/build-rpm.sh [OUTDIR]        (default: dist/rpm)
#
# The source tarball holds what the spec uses (SOURCE_PATHS), as far as git
# knows about it or would add it (tracked and untracked, minus .gitignore'd
# files), as it is on disk: uncommitted work is packaged the way `make test`
# sees it, and no cache or build output is.
#
# Environment:
#   RPM_TOPDIR  rpmbuild's scratch tree (default: build/rpmbuild)
#   PYTHON      the build Python off Fedora (default: .venv/bin/python, which
#               has the runtime dependencies the man page generator imports)
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
out=$(realpath -m "${1:-$repo/dist/rpm}")
top=$(realpath -m "${RPM_TOPDIR:-$repo/build/rpmbuild}")
spec=$repo/rpm/qvaudio.spec
python=${PYTHON:-}
if [ -z "$python" ]; then
    if [ -x "$repo/.venv/bin/python" ]; then python=$repo/.venv/bin/python; else python=python3; fi
fi
# rpmbuild runs each section in the unpacked tree: the path must not be relative.
python=$(command -v "$python") || { echo "build-rpm: no Python at ${PYTHON:-python3}" >&2; exit 1; }
python=$(realpath -s "$python")
SOURCE_PATHS=(pyproject.toml README.md qvaudio.yaml qvaudio policy systemd docs rpm
    scripts/make-manpages.py)

for tool in rpmbuild rpm git tar; do
    command -v "$tool" >/dev/null || { echo "build-rpm: $tool not found" >&2; exit 1; }
done

# The spec's Version must be the package's version, or the wheel and the
# spec's file list (qvaudio-VERSION.dist-info) disagree.
version=$(sed -n 's/^Version:[[:space:]]*//p' "$spec")
project_version=$(cd "$repo" && "$python" -c \
    'import tomllib; print(tomllib.load(open("pyproject.toml", "rb"))["project"]["version"])')
if [ "$version" != "$project_version" ]; then
    echo "build-rpm: $spec says Version $version, pyproject.toml says $project_version" >&2
    exit 1
fi

rm -rf "$top"
mkdir -p "$top"/{SOURCES,SPECS,BUILD,RPMS,SRPMS} "$out"
tarball=$top/SOURCES/qvaudio-$version.tar.gz
(
    cd "$repo"
    git ls-files -z --cached --others --exclude-standard -- "${SOURCE_PATHS[@]}" |
        while IFS= read -r -d '' f; do [ -f "$f" ] && printf '%s\0' "$f"; done |
        tar --null -T - --sort=name --owner=0 --group=0 --numeric-owner \
            --transform "s,^,qvaudio-$version/," -czf "$tarball"
)

defines=(--define "_topdir $top")
nodeps=()
if [ -z "$(rpm --eval '%{?fedora}%{?rhel}')" ]; then
    # Not Fedora: the spec's fallback branch builds the wheel with pip, offline,
    # from a local wheelhouse holding pyproject.toml's build requirements.
    wheelhouse=$repo/build/rpm-wheelhouse
    mapfile -t build_requires < <(cd "$repo" && "$python" -c \
        'import tomllib; print(*tomllib.load(open("pyproject.toml", "rb"))["build-system"]["requires"], sep="\n")')
    mkdir -p "$wheelhouse"
    if ! "$python" -m pip download -q --no-deps --no-index --find-links "$wheelhouse" \
        -d "$wheelhouse" "${build_requires[@]}" >/dev/null 2>&1; then
        echo "build-rpm: fetching the build backend (${build_requires[*]}) into $wheelhouse" >&2
        "$python" -m pip download -q --no-deps --only-binary :all: -d "$wheelhouse" \
            "${build_requires[@]}"
    fi
    defines+=(--define "build_python $python" --define "build_wheelhouse $wheelhouse")
    # Debian's brp-compress uses bash's `read -d` under #!/bin/sh and so
    # compresses no man page; run the same script with bash.
    defines+=(--define "__brp_compress bash %{_rpmconfigdir}/brp-compress %{?_prefix}")
    # BuildRequires name Fedora packages that an empty rpm database never has.
    nodeps=(--nodeps)
fi

rpmbuild -ba "${defines[@]}" "${nodeps[@]}" "$spec"

rm -f "$out"/*.rpm
cp "$top"/RPMS/noarch/*.rpm "$top"/SRPMS/*.src.rpm "$out"/
ls -1 "$out"/*.rpm
