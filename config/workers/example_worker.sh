#!/bin/sh
# A redis-streamd worker (mode = "worker"), protocol version 1, in POSIX shell.
# Request: "<id> <attempt> <length>\n<payload>\n"; reply: "ok" | "fail <reason>" | "dlq <reason>".
# `read` consumes exactly one line; dd with bs=1 reads exactly the payload (head -c may
# read ahead on a pipe and swallow the next request).
while IFS=' ' read -r id attempt len; do
  payload=$(dd bs=1 count="$len" 2>/dev/null)
  dd bs=1 count=1 >/dev/null 2>&1   # the newline after the payload
  case "$payload" in
    fail*) echo "fail payload asked to fail" ;;
    "")    echo "dlq empty payload" ;;
    *)     echo "worker $REDIS_STREAMD_WORKER handled $id (attempt $attempt)" >&2
           echo "ok" ;;
  esac
done
