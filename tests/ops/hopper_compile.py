"""Compiles recorded kernel launches for Hopper (sm_90a) without a GPU; run without the
interpreter by ``test_hopper_compile.py``, which gives the launches as JSON on stdin. Prints a line
per launch compiled, each failure with its error on stderr, and exits with 1 if any failed.

Each launch compiles as the JIT would compile it on the GPU: positional ints equal to 1 become
constants, tensors 16-byte aligned and ints that are multiples of 16 carry Triton's divisibility
hint (ints only where the kernel does not ask ``do_not_specialize``), None and bool arguments
are constants, and the launch options (warps, stages, register cap) are passed on."""

import importlib
import json
import sys
import traceback

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend

HOPPER = GPUTarget("cuda", 90, 32)
TRITON_DTYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "bool": "i1"} | {
    f"int{n}": f"i{n}" for n in (8, 16, 32, 64)
}


def jit_function(record):
    kernel = getattr(importlib.import_module(record["module"]), record["name"])
    while not isinstance(kernel, triton.runtime.jit.JITFunction):
        kernel = kernel.fn
    return kernel


def source(record) -> ASTSource:
    fn = jit_function(record)
    signature, constexprs, attrs = {}, dict(record["constexprs"]), {}
    for i, (name, arg) in enumerate(zip(fn.arg_names, record["args"])):
        specialized = not fn.params[i].do_not_specialize
        if "constexpr" in arg or (specialized and arg.get("int") == 1):
            constexprs[name] = arg.get("constexpr", arg.get("int"))
        elif "dtype" in arg:
            signature[name] = "*" + TRITON_DTYPES[arg["dtype"]]
            if arg["aligned"]:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif "int" in arg:
            signature[name] = "i32" if -(2**31) <= arg["int"] < 2**31 else "i64"
            if specialized and arg["int"] % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            signature[name] = "fp32"
    signature |= {name: "constexpr" for name in constexprs}
    return ASTSource(fn, {name: signature[name] for name in fn.arg_names}, constexprs, attrs)


def main() -> int:
    failed = 0
    backend = make_backend(HOPPER)
    for record in json.load(sys.stdin):
        label = f"{record['name']} {record['constexprs']} {record['options']}"
        try:
            options = backend.parse_options(record["options"])
            triton.compile(source(record), target=HOPPER, options=options.__dict__)
            print(f"ok      {label}", flush=True)
        except Exception:
            failed += 1
            print(f"FAILED  {label}\n{traceback.format_exc(limit=-1)}", file=sys.stderr, flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
