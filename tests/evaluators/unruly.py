"""A protocol-1 evaluator that misbehaves the ways real ones do, for sewa's process tests
(standard library only). Without options it answers every evaluation with loss 1.0.

usage: unruly.py [--pids FILE] [--fork] [--stubborn] [--hang] [--close-stdout] [--flood N]
  --pids FILE     write "LEADER_PID PGID HELPER_PID" to FILE once started (HELPER_PID 0 without
                  --fork): the test finds the whole process group from it
  --fork          start a helper process that sleeps forever in the evaluator's process group,
                  holding its pipes, as torchrun's workers and forked data loaders do
  --stubborn      the evaluator and its helper ignore SIGTERM (only SIGKILL stops them)
  --hang          never answer an evaluation, and do not leave when stdin closes
  --close-stdout  on the first evaluation, close stdout and live on without answering
  --flood N       before answering each evaluation, print N lines to stderr and a progress bar
                  of N frames redrawn with carriage returns
"""

import argparse
import json
import os
import signal
import sys
import time


def sleep_forever():
    while True:
        time.sleep(3600)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--pids", default="")
    ap.add_argument("--fork", action="store_true")
    ap.add_argument("--stubborn", action="store_true")
    ap.add_argument("--hang", action="store_true")
    ap.add_argument("--close-stdout", action="store_true")
    ap.add_argument("--flood", type=int, default=0)
    args = ap.parse_args()
    if args.stubborn:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    helper = 0
    if args.fork:
        helper = os.fork()
        if helper == 0:
            sleep_forever()
    if args.pids:
        tmp = args.pids + ".tmp"
        with open(tmp, "w") as f:
            f.write(f"{os.getpid()} {os.getpgrp()} {helper}\n")
        os.rename(tmp, args.pids)
    stdin = sys.stdin.buffer
    hello = json.loads(stdin.readline())
    send({"type": "hello", "protocol": 1, "grad": False, "name": "unruly"})
    del hello
    while True:
        line = stdin.readline()
        if not line:
            if args.hang:
                sleep_forever()
            return
        req = json.loads(line)
        if req.get("type") != "evaluate":
            return
        if args.close_stdout:
            os.close(1)
            sleep_forever()
        if args.hang:
            sleep_forever()
        flood(args.flood)
        send({"type": "result", "id": req["id"], "loss": 1.0})


def flood(n):
    err = sys.stderr
    for i in range(n):
        err.write(f"flood line {i} of {n}\n")
    for i in range(1, n + 1):
        err.write(f"\rprogress frame {i}/{n}")
    if n:
        err.write("\n")
    err.flush()


def send(msg):
    os.write(1, (json.dumps(msg) + "\n").encode())


if __name__ == "__main__":
    main()
