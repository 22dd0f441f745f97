"""Which policy the demo's dom0 uses: the one qvaudio-dom0 would, else its own."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from qvaudio.common.config import Config, ConfigError, load_config
from qvaudio.demo import VM_NAME
from qvaudio.dom0.policy_loader import DEFAULT_POLICY_DIR, POLICY_DIR_ENV, SOURCE_POLICY_DIR

#: The demo's own policy, for a machine with none installed.
OWN_POLICY = f"""\
# Written by `qvaudio demo` because no policy is installed: the demo VM may
# play, nothing may record. Your own policy goes in /etc/qvaudio/policy.d.
rules:
  - vm: {VM_NAME}
    playback: allow
    capture: deny
"""


@dataclass
class PolicyChoice:
    directory: Path
    #: Why this one, in words.
    why: str


def choose_policy(config: Config | None, own_dir: Path) -> PolicyChoice:
    """The policy qvaudio-dom0 would use here; else the demo's own, written to `own_dir`.

    The same order as the agent (its flag aside): the config's
    dom0.policy_dir, $QVAUDIO_POLICY_DIR, /etc/qvaudio/policy.d, a source
    checkout's policy/. A directory the person named is used even if it does
    not exist: dom0 then reports the problem, and so does the demo.
    """
    if config is not None and config.dom0.policy_dir:
        return PolicyChoice(Path(config.dom0.policy_dir), f"dom0.policy_dir in {config.source}")
    configured = os.environ.get(POLICY_DIR_ENV)
    if configured:
        return PolicyChoice(Path(configured), f"from ${POLICY_DIR_ENV}")
    if DEFAULT_POLICY_DIR.exists():
        return PolicyChoice(DEFAULT_POLICY_DIR, "your installed policy")
    if SOURCE_POLICY_DIR.is_dir():
        return PolicyChoice(SOURCE_POLICY_DIR, "the policy shipped in this source checkout")
    own_dir.mkdir(mode=0o700)
    (own_dir / "50-demo.yaml").write_text(OWN_POLICY)
    return PolicyChoice(
        own_dir,
        f"the demo's own (allow {VM_NAME}), since no policy is installed in {DEFAULT_POLICY_DIR}",
    )


def load_config_or_none() -> Config | None:
    """The config both agents will read, or None if it is broken (they report it)."""
    try:
        return load_config()
    except ConfigError:
        return None
