"""``python -m benchmarks <what> [options]``, from the repository root:

    speed      TFLOP/s of nbflash against naive CuPy attention and PyTorch's SDPA backends
    backward   the backward alone: nbflash's tile configurations against torch's flash backend
    memory     peak extra GPU memory versus seqlen, nbflash against naive attention
    io         bytes moved to and from GPU memory: nbflash.io_model against Nsight Compute
    animate    a GIF of the forward pass, tile by tile (runs without a GPU)
    resources  registers, shared and local memory of every compiled kernel

``python -m benchmarks <what> --help`` lists each one's options. Results go to
benchmarks/results/<gpu-name>/; without a GPU, the GPU commands say so and exit.
"""
import importlib
import sys

COMMANDS = {"speed": "benchmarks.speed", "backward": "benchmarks.backward",
            "memory": "benchmarks.memory", "io": "benchmarks.hbm",
            "animate": "benchmarks.animate", "resources": "benchmarks.resources"}


def main():
    if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS:
        print(__doc__.strip())
        return 2
    importlib.import_module(COMMANDS[sys.argv[1]]).main(sys.argv[2:])
    return 0


if __name__ == "__main__":
    sys.exit(main())
