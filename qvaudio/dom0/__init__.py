"""The dom0 agent's shell: VM discovery, host streams, XenStore, policy files, control socket."""
