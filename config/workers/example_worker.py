#!/usr/bin/env python3
"""A redis-streamd worker (mode = "worker"), protocol version 1, in plain Python.

The daemon writes, for each entry:   <id> <attempt> <length>\n<payload bytes>\n
and reads one reply line:            ok | fail <reason> | dlq <reason>
stdout is for replies only; log to stderr. End of file on stdin means: exit.
"""
import json
import sys


class Reject(Exception):
    """The entry can never succeed: send it to the dead-letter stream."""


def handle(entry_id: str, attempt: int, payload: bytes) -> None:
    # Replace with real work. Raise Reject for bad input, any other exception to retry.
    if payload.startswith(b"fail"):
        raise RuntimeError("payload asked to fail")
    if payload.startswith(b"{"):
        try:
            json.loads(payload)
        except ValueError as exc:
            raise Reject(f"invalid JSON: {exc}") from exc
    print(f"worker handled {entry_id} (attempt {attempt}): {len(payload)} bytes", file=sys.stderr)


def main() -> None:
    requests, replies = sys.stdin.buffer, sys.stdout.buffer
    while True:
        header = requests.readline()
        if not header:
            return  # the daemon closed stdin: shut down
        entry_id, attempt, length = header.decode().split()
        payload = requests.read(int(length))
        requests.read(1)  # the newline after the payload
        try:
            handle(entry_id, int(attempt), payload)
            reply = "ok"
        except Reject as exc:
            reply = f"dlq {exc}"
        except Exception as exc:  # noqa: BLE001 - any other error is a retryable failure
            reply = f"fail {type(exc).__name__}: {exc}"
        replies.write(reply.replace("\n", " ").encode() + b"\n")
        replies.flush()


if __name__ == "__main__":
    main()
