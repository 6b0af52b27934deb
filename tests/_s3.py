"""moto's standalone S3 server on 127.0.0.1 for tests (what Ray's own storage tests use)."""
from __future__ import annotations

import logging
from contextlib import contextmanager

from _ray_cluster import free_port

BUCKET = "c40-ci"


@contextmanager
def s3_server():
    """Yields (env, fs): the AWS variables that point pyarrow/boto3 at the server, and a pyarrow
    S3FileSystem on it with the bucket BUCKET created. Nothing is read from ~/.aws."""
    import pyarrow.fs as pafs
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=free_port())
    server.start()
    endpoint = "http://127.0.0.1:%d" % server.get_host_and_port()[1]
    env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1",
           "AWS_DEFAULT_REGION": "us-east-1"}
    fs = pafs.S3FileSystem(access_key="testing", secret_key="testing", region="us-east-1",
                           endpoint_override=endpoint, scheme="http", allow_bucket_creation=True)
    try:
        fs.create_dir(BUCKET)
        yield env, fs
    finally:
        server.stop()
