"""A decode function whose module kills any process but the test's own that imports it (tests only).

A spawned decode worker imports it while unpickling its arguments, so every worker dies before it
takes a file: what a broken installation, or code changed under a running ingest, looks like.
"""

from __future__ import annotations

import os

from tasks.ingest.decode import Inspected, inspect_image

if os.environ.get("TRAIN_FOOD_TEST_PARENT", str(os.getpid())) != str(os.getpid()):
    os._exit(7)


def decode(job: tuple[int, str], **options: object) -> Inspected:
    return inspect_image(job, **options)
