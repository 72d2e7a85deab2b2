"""``ckpt train`` in a process that kills itself (SIGKILL) at a chosen moment, for
tests/test_resume.py.

    python tests/resume_worker.py step:K   -- train ARGS...   after the K-th optimizer step
    python tests/resume_worker.py epoch:E  -- train ARGS...   right after epoch E's state is written
    python tests/resume_worker.py none     -- train ARGS...   not at all

A kill in the middle of a state write is the library's own seam, CKPT_STATE_WRITE_HALT.
"""
import os
import signal
import sys

from ckpt import cli
from ckpt.resume import StateFolder


def die():
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def main():
    when, argv = sys.argv[1], sys.argv[sys.argv.index("--") + 1:]
    kind, _, value = when.partition(":")
    if kind == "step":
        real_fit, steps = cli.fit, [0]

        def fit(*args, step_callback, **kwargs):
            def counted(info):
                step_callback(info)
                steps[0] += 1
                if steps[0] == int(value):
                    die()
            return real_fit(*args, step_callback=counted, **kwargs)
        cli.fit = fit
    elif kind == "epoch":
        real_write = StateFolder.write

        def write(self, state):
            real_write(self, state)
            if state.step == 0 and state.epoch == int(value):
                die()
        StateFolder.write = write
    return cli.main(argv)


if __name__ == "__main__":
    sys.exit(main())
