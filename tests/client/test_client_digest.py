"""The client's BLAKE2b (client/blake2b.c) gives the daemon's digest of an output
(daemon/shapes.py digest, hashlib.blake2b with 16 bytes): an operation the data plane
hands over to the daemon carries digests the daemon compares with a replay's."""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

import pytest
from clientbuild import CLIENT, SANITIZER_ENV, compile_c, sanitizer_report

MAIN = r"""
#include <stdio.h>
#include <stdlib.h>
#include "direct.h"

int main(void)
{
	size_t cap = 1 << 20, n = 0, got;
	unsigned char *buf = malloc(cap), d[P11P_DIGEST_SIZE];

	while (buf != NULL && (got = fread(buf + n, 1, cap - n, stdin)) > 0)
		n += got;
	if (buf == NULL)
		return 2;
	p11p_digest16(buf, n, d);
	for (int i = 0; i < P11P_DIGEST_SIZE; i++)
		printf("%02x", d[i]);
	printf("\n");
	free(buf);
	return 0;
}
"""

# around the 128-byte block: the empty input, partial, exact and multiple blocks
SIZES = [0, 1, 3, 64, 127, 128, 129, 255, 256, 257, 1000, 4096, 65537, 300_001]


@pytest.fixture(scope="module", params=["plain", "asan"])
def digest_tool(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("digest")
    main = d / "main.c"
    main.write_text(MAIN)
    return compile_c(d / f"digest-{request.param}", [main, CLIENT / "blake2b.c"],
                     request.param == "asan", [])


def test_client_digest_is_the_daemons(digest_tool: Path) -> None:
    for size in SIZES:
        data = os.urandom(size)
        done = subprocess.run([str(digest_tool)], input=data, capture_output=True,
                              env={**os.environ, **SANITIZER_ENV}, timeout=60)
        assert done.returncode == 0 and not sanitizer_report(done.stderr.decode()), done.stderr
        assert done.stdout.decode().strip() == hashlib.blake2b(data, digest_size=16).hexdigest(), size
