"""``crash-pyav``: a video decoder that kills its own process on chosen clips (a decoder segfault, the kernel's
out-of-memory killer), registered in vlp's decoder registry; PyAV decodes every other clip.

Which clips: ``VLP_TEST_CRASH`` holds comma-separated MD5 hex digests of the clip bytes, or ``all``. Read at
decode time, in the decode process (which inherits the driver's environment).
"""

from __future__ import annotations

import hashlib
import os
import signal

from vlp.data.media import VIDEO_DECODERS, Decoded, VideoDecoder, decode_video_pyav

ENV = "VLP_TEST_CRASH"


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


@VIDEO_DECODERS.register("crash-pyav")
class CrashPyAV(VideoDecoder):
    name = "crash-pyav"

    def decode(self, data, sampling, cfg) -> Decoded:
        which = os.environ.get(ENV, "")
        if which == "all" or md5(data) in which.split(","):
            os.kill(os.getpid(), signal.SIGKILL)
        return decode_video_pyav(data, sampling, cfg)
