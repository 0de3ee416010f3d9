/* Segmented copies for the data stream (recsys.data.segments).
 *
 * copy_segments: the runs src[starts[i] : starts[i] + lengths[i]], i < n, end to end into dst
 * (int64 or int32 values, or int64 narrowed into int32: the stream hands models int32 ids
 * when every table fits).
 * NumPy needs a per-value index (a running sum, then a gather) for the same result; one
 * memcpy per run is several times faster and touches each value once. Bounds are checked by
 * the caller (recsys/data/segments.py), which owns every array passed here.
 *
 * scatter_segments: row i's run appended to the output of batch batch_of[i] (rows with
 * batch_of[i] < 0 are not read). cursors[b] and ends[b] are the addresses of where batch b's
 * output is filled up to and where it ends; cursors advance as rows are written. Every bound
 * is checked here, before each copy: it returns -1, or the first row that lies outside src,
 * names a batch >= batches, or would overflow its batch's output (rows before it are
 * written). Like copy_segments, it narrows int64 sources into int32 outputs.
 *
 * Built as a CPython extension so that setuptools compiles it with the package; it exports
 * no Python functions and is loaded through ctypes. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

/* The calling convention below; recsys/data/segments.py refuses a build that reports
 * another (an old in-place build would read and write the wrong number of bytes). */
int64_t segments_abi(void) { return 3; }

/* Values are int64 or int32 (item, from_item: their sizes in bytes); both functions also
 * narrow int64 sources into int32 outputs (ids the caller has checked to fit). */

/* length values from src into dst: one memcpy, or the narrowing loop. */
static void copy_run(char *dst, const char *src, int64_t length, int64_t item,
                     int64_t from_item) {
    if (item == from_item) {
        memcpy(dst, src, (size_t)(length * item));
        return;
    }
    const int64_t *wide = (const int64_t *)src;
    int32_t *narrow = (int32_t *)dst;
    for (int64_t j = 0; j < length; j++)
        narrow[j] = (int32_t)wide[j];
}

void copy_segments(const char *src, const int64_t *starts, const int64_t *lengths, int64_t n,
                   char *dst, int64_t item, int64_t from_item) {
    for (int64_t i = 0; i < n; i++) {
        copy_run(dst, src + starts[i] * from_item, lengths[i], item, from_item);
        dst += lengths[i] * item;
    }
}

int64_t scatter_segments(const char *src, int64_t size, const int64_t *starts,
                         const int64_t *lengths, const int64_t *batch_of, int64_t n,
                         int64_t batches, int64_t *cursors, const int64_t *ends, int64_t item,
                         int64_t from_item) {
    for (int64_t i = 0; i < n; i++) {
        int64_t b = batch_of[i], start = starts[i], length = lengths[i];
        if (b < 0)
            continue;
        if (b >= batches || length < 0 || start < 0 || start > size - length ||
            length > (ends[b] - cursors[b]) / item)
            return i;
        if (item != from_item && (item != 4 || from_item != 8))
            return i; /* only int64 into int32 narrows; the caller refuses other pairs */
        copy_run((char *)cursors[b], src + start * from_item, length, item, from_item);
        cursors[b] += length * item;
    }
    return -1;
}

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_segments",
                                    "Segmented copies (loaded through ctypes).", -1, NULL};

PyMODINIT_FUNC PyInit__segments(void) { return PyModule_Create(&module); }
