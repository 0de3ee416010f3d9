/* Segmented copies for the data stream (recsys.data.segments).
 *
 * copy_segments: the runs src[starts[i] : starts[i] + lengths[i]], i < n, end to end into dst.
 * NumPy needs a per-value index (a running sum, then a gather) for the same result; one
 * memcpy per run is several times faster and touches each value once. Bounds are checked by
 * the caller (recsys/data/segments.py), which owns every array passed here.
 *
 * Built as a CPython extension so that setuptools compiles it with the package; it exports
 * no Python functions and is loaded through ctypes. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

void copy_segments(const int64_t *src, const int64_t *starts, const int64_t *lengths,
                   int64_t n, int64_t *dst) {
    for (int64_t i = 0; i < n; i++) {
        int64_t length = lengths[i];
        memcpy(dst, src + starts[i], (size_t)length * sizeof(int64_t));
        dst += length;
    }
}

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_segments",
                                    "Segmented copies (loaded through ctypes).", -1, NULL};

PyMODINIT_FUNC PyInit__segments(void) { return PyModule_Create(&module); }
