"""``python -m jaxtl.train`` with a fault injected into the N-th checkpoint save.

JAXTL_TEST_FAULT = "hang:N" (the N-th save writes all its data, touches
$JAXTL_TEST_MARKER and then hangs just before committing - a kill -9 lands
in the middle of the checkpoint write), "enospc:N" (the N-th save fails as
a full disk would) or "sigint2:N" (two SIGINTs arrive while the N-th save
commits, as from a user pressing Ctrl-C twice). The hook is orbax's commit step of a step folder: the
temporary folder holds the complete data and is renamed into place only after it.
"""

import asyncio
import errno
import os
import signal
import sys
from pathlib import Path

from orbax.checkpoint._src.path import atomicity

kind, _, nth = os.environ["JAXTL_TEST_FAULT"].partition(":")
nth = int(nth)
_original = atomicity.AtomicRenameTemporaryPath.finalize
_calls = {"n": 0}


async def finalize(self):
    if not self.get_final().name.isdigit():  # item folders inside a step are finalized too: count steps only
        return await _original(self)
    _calls["n"] += 1
    if _calls["n"] == nth:
        if kind == "hang":
            Path(os.environ["JAXTL_TEST_MARKER"]).write_text("in checkpoint write")
            await asyncio.sleep(3600)
        elif kind == "enospc":
            raise OSError(errno.ENOSPC, "No space left on device")
        elif kind == "sigint2":
            for _ in range(2):
                os.kill(os.getpid(), signal.SIGINT)
                await asyncio.sleep(0.05)
    return await _original(self)


atomicity.AtomicRenameTemporaryPath.finalize = finalize

from jaxtl.train import main  # noqa: E402

sys.exit(main(sys.argv[1:]))
