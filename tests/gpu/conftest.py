"""GPU tests: marked `gpu`, skipped unless a CUDA GPU and CuPy are present."""

import pytest


def pytest_collection_modifyitems(config, items):
    from sparsify_cli.kernels.availability import cuda_kernels_status

    ok, why = cuda_kernels_status()
    for item in items:
        if "tests/gpu/" in str(item.fspath).replace("\\", "/"):
            item.add_marker(pytest.mark.gpu)
            if not ok:
                item.add_marker(pytest.mark.skip(reason=f"CUDA kernels unavailable: {why}"))
