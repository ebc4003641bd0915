"""The fault matrix: every member-failure cause x every workload x both policies, with
two members holding the same keys. A real application (workload_app.py through
p11p-client.so) must see no error, and every output must verify."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import pytest
from hakit import HAGroup, WorkloadApp

WORKLOADS = ["ecdsa", "rsa_multipart", "aes_cbc", "find", "created_key", "unwrapped_key",
             "private_attribute"]
CAUSES = ["CKR_DEVICE_ERROR", "CKR_TOKEN_NOT_PRESENT", "CKR_GENERAL_ERROR",
          "CKR_DEVICE_REMOVED", "CKR_DEVICE_MEMORY", "helper-killed", "hang"]


FAILED_A = "member failure detected: group=ha member=hsmA"


def inject(group: HAGroup, app: WorkloadApp, cause: str) -> None:
    if cause == "helper-killed":
        os.kill(group.app_helper(app.proc.pid, "hsmA"), signal.SIGKILL)
    elif cause == "hang":
        group.set_rules("hsmA", "* hang\n")
    else:
        group.set_rules("hsmA", f"* error rv={cause}\n")


@pytest.mark.parametrize("policy", ["failover", "balance"])
@pytest.mark.parametrize("cause", CAUSES)
def test_member_failure_is_invisible(ha_factory: Any, ha_keys: Path, policy: str, cause: str) -> None:
    group: HAGroup = ha_factory(policy, ["hsmA", "hsmB"])
    app = WorkloadApp(group.daemon, ha_keys)
    results = {}
    try:
        for workload in WORKLOADS:
            group.wait_state("hsmA", "OK")
            # and the application logged in there again (in the background: a call it
            # has in flight there would make balance place the workload on hsmB)
            group.wait_logged_in(app.proc.pid, ["hsmA"])
            failures = group.daemon.log_text().count(FAILED_A)
            assert app.send(f"begin {workload}") == "ready"
            inject(group, app, cause)
            results[workload] = app.send("finish")
            group.set_rules("hsmA", "")
            # the fault really took hsmA out during this workload
            assert group.daemon.log_text().count(FAILED_A) == failures + 1, workload
    finally:
        app.close()
        group.set_rules("hsmA", "")
    log = group.daemon.log_text()
    assert all(r.startswith("ok") for r in results.values()), results
    assert "member failure detected: group=ha member=hsmA" in log
    assert "session failed over" in log
    assert "member recovered: group=ha member=hsmA" in log
