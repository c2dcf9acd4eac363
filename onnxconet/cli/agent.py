"""`onnxconet agent`: run on the edge device; the workstation measures there with --target http://HOST:PORT."""

from __future__ import annotations

import logging
import os
import secrets
import signal
import sys
from pathlib import Path
from typing import Annotated

import typer

from onnxconet.cli.app import _run, app, err


@app.command()
def agent(
    host: Annotated[
        str,
        typer.Option(
            "--host",
            help="Address to listen on. The default, 127.0.0.1, answers this machine only (reach it through "
            "an SSH tunnel); 0.0.0.0 opens it to the network: anyone who has the token can run timings.",
        ),
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=0, max=65535, help="Port (0: any free one).")] = 8765,
    token: Annotated[
        str | None,
        typer.Option(
            "--token",
            help="The token clients must send (at least 16 characters; default: $ONNXCONET_TOKEN, else a new "
            "random one, printed at start).",
        ),
    ] = None,
    max_upload_mb: Annotated[
        int, typer.Option("--max-upload-mb", min=1, help="Largest ONNX upload accepted.")
    ] = 512,
    job_seconds: Annotated[
        float, typer.Option("--job-seconds", min=1, help="Longest a client may hold the device for one job.")
    ] = 600.0,
    queue_seconds: Annotated[
        float,
        typer.Option("--queue-seconds", min=0, help="Longest a client waits for the device before a 503."),
    ] = 600.0,
    log_file: Annotated[
        Path | None, typer.Option("--log", help="Also append the request log (who asked for what) here.")
    ] = None,
) -> None:
    """Serve this machine as a latency target: a workstation's `profile`/`search --target http://HOST:PORT
    --token TOKEN` times its candidate ONNX files here, one job at a time. Uploads are checked ONNX, kept in a
    private temporary folder removed at exit; every request needs the token."""
    from onnxconet.latency.agent import Agent, make_server
    from onnxconet.latency.device import TOKEN_ENV

    token = token or os.environ.get(TOKEN_ENV) or secrets.token_urlsafe(24)
    logger = logging.getLogger("onnxconet.agent")
    logger.setLevel(logging.INFO)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    logger.addHandler(handler)
    if log_file is not None:
        fh = logging.FileHandler(log_file)
        fh.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
        logger.addHandler(fh)
    logger.propagate = False
    state = _run(
        Agent, token, max_upload=max_upload_mb << 20, job_seconds=job_seconds, queue_seconds=queue_seconds
    )
    try:
        server = make_server(state, host, port)
    except OSError as e:
        state.close()
        err.print(f"[bold red]error:[/] cannot listen on {host}:{port}: {e.strerror or e}", highlight=False)
        raise typer.Exit(1) from None
    bound = server.server_address[1]
    print(f"onnxconet agent on http://{host}:{bound} token {token}", flush=True)
    err.print(
        f"on the workstation: onnxconet profile MODEL --target http://{host}:{bound} --token {token}"
        + ("" if host in ("127.0.0.1", "localhost", "::1") else "  (listening beyond loopback)"),
        highlight=False,
        soft_wrap=True,
    )
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        state.close()
        err.print("agent stopped; its folder is removed", highlight=False)
