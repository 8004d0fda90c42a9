"""Protocol-level evaluator for sewa's service tests (standard library only): answers the hello
and every evaluation after a delay, or never. It leaves as soon as sewa closes its stdin, even
in the middle of a delay, so a test that kills sewa leaves no process behind.

usage: sleepy.py [--start-delay S] [--call-delay S] [--hang] [--report SOCKET]
  --start-delay S  wait S seconds before answering the hello (a slow import or data load)
  --call-delay S   wait S seconds before answering each evaluation
  --hang           never answer an evaluation (sewa's timeout_s decides what happens)
  --report SOCKET  send a datagram "start" when started and "call ID" when a request arrives
                   to this unix socket (the test binds it and times arrivals on its own clock)
The loss is 1 + id / 1000: deterministic, different for every request, no gradient.
"""

import argparse
import json
import os
import select
import socket
import sys
import time

buffered = b""


def report(args, what):
    if args.report:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.sendto(what.encode(), args.report)


def fill():
    """Read what stdin has; leave when sewa closed it."""
    global buffered
    chunk = os.read(0, 65536)
    if not chunk:
        sys.exit(0)
    buffered += chunk


def read_message():
    global buffered
    while b"\n" not in buffered:
        fill()
    line, buffered = buffered.split(b"\n", 1)
    return json.loads(line)


def wait(seconds):
    """Sleep up to `seconds`, watching stdin: sewa sends nothing while it waits for an answer,
    so stdin becoming readable means it closed it (or queued more, which is kept)."""
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        ready, _, _ = select.select([0], [], [], min(left, 3600))
        if ready:
            fill()


def send(msg):
    os.write(1, (json.dumps(msg) + "\n").encode())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--start-delay", type=float, default=0.0)
    ap.add_argument("--call-delay", type=float, default=0.0)
    ap.add_argument("--hang", action="store_true")
    ap.add_argument("--report", default="")
    args = ap.parse_args()
    report(args, "start")
    hello = read_message()
    wait(args.start_delay)
    send({"type": "hello", "protocol": hello.get("protocol", 1), "grad": False, "name": "sleepy"})
    while True:
        req = read_message()
        if req.get("type") != "evaluate":
            return
        report(args, f"call {req['id']}")
        wait(float("inf") if args.hang else args.call_delay)
        send({"type": "result", "id": req["id"], "loss": 1.0 + req["id"] / 1000.0})


if __name__ == "__main__":
    main()
