"""Run the suite on another kernel: boot it under QEMU with this project shared from the host, run
pytest inside against the guest kernel's /dev/kvm, answer in `git bisect run` codes.

`runner.run(RunConfig(...))` is the entry point; `python -m harness kernel` is its command line.
See docs/kernel-runner.md.
"""
