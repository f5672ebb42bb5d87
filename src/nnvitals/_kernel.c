/* A sampled pass on the CPU with less Python: its statistics in one pass over each tensor, and the
 * forward hook's common case.
 *
 * probes.py reduces recorded outputs, gradients and weights with torch ops. On the CPU each of those
 * ops costs microseconds of dispatch however small its tensor, and a sampled step of a small network
 * needs a hundred of them; `reduce` computes the same numbers, written at the same places of the
 * same float32 buffer, in one call. probes.py describes the work as an array of `item_t` (one per
 * tensor, a numpy structured array of the same layout; `addresses` fills in where the tensors are) and
 * falls back to torch ops where this module was not built or the tensors are not on the CPU. `Replay` is
 * the process-wide forward hook for a pass that repeats the last one's records: the steps of
 * Recorder's Python hook, without the interpreter, handing every other call to that hook. `Watch` hands it
 * the watched modules' calls without a process-wide hook, where that is known to see them all.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "_autograd.h"

/* nnvitals._autograd's functions, where it was built (see _autograd.h); `torch_api`: those in use (NULL: torch's
 * Python API instead; see borrow) */
static const nnvitals_autograd_api *lent, *torch_api;

enum {
    MOMENTS = 0, TANH = 1, SIGMOID = 2, RELU = 3, GRAD = 4,
    COPY = 5,       /* the values themselves, to y */
    UPDATE = 6,     /* a weight: also the sum and the sum of squares of x - y (its update) at o_usum, o_usq */
    UPDATE_COPY = 7 /* UPDATE, then x copied to y (the copy the next update is measured against) */
};

typedef struct {
    int64_t x;                   /* address of the float32 values; 0: all zeros (a missing gradient) */
    int64_t y;                   /* UPDATE: the weight's copy before the step; COPY: where x is copied to */
    int64_t outer, units, inner; /* value (o, u, i) at (o * units + u) * inner + i; an example is (o, i) */
    int64_t mode;                /* what is measured beyond the sum and the sum of squares */
    int64_t o_sum, o_sq;         /* where the results go in `out` (float32 slots); -1: not wanted */
    int64_t o_flag, o_hist, o_alive;
    int64_t cells;               /* offset of a map_rows x map_units bool map in `cells`; -1: none */
    int64_t map_rows, map_units;
    int64_t numel;               /* outer * units * inner (checked on the Python side) */
    int64_t o_usum, o_usq;       /* UPDATE: where the update's sum and sum of squares go */
    double lo, hi;               /* histogram range (GRAD: in units of the tensor's own std) */
} item_t;

typedef struct {
    int64_t bins;
    float saturation_cut, dead_cut;
    uint8_t *cells; /* the saturation maps' cells */
} config_t;

#define BLOCK 2048 /* values summed in float32 lanes before the partial sum is added in double */

/* Four float32 lanes (a SIMD register where there is one; GCC and Clang vector extensions), loaded unaligned. */
typedef float lanes_t __attribute__((vector_size(16)));
static inline lanes_t load(const float *p) {
    lanes_t v;
    memcpy(&v, p, sizeof v);
    return v;
}

/* Sum and sum of squares of x in 16 float32 accumulators, four independent chains of adds, so that one add
 * need not wait for the one before. */
static void moments(const float *x, int64_t n, double *sum, double *sq) {
    double a = 0.0, b = 0.0;
    for (int64_t start = 0; x != NULL && start < n; start += BLOCK) {
        const int64_t end = n - start < BLOCK ? n : start + BLOCK;
        lanes_t s[4] = {{0}}, q[4] = {{0}};
        int64_t i = start;
        for (; i + 16 <= end; i += 16) {
            for (int k = 0; k < 4; k++) {
                const lanes_t v = load(x + i + 4 * k);
                s[k] += v;
                q[k] += v * v;
            }
        }
        float fa = 0.0f, fb = 0.0f;
        for (; i < end; i++) {
            fa += x[i];
            fb += x[i] * x[i];
        }
        for (int k = 0; k < 4; k++) {
            for (int l = 0; l < 4; l++) {
                fa += s[k][l];
                fb += q[k][l];
            }
        }
        a += fa;
        b += fb;
    }
    *sum = a;
    *sq = b;
}

/* A weight in one pass: the sums of w and of its update w - before (in float32, as torch has it), and with
 * `copy` w written over `before` as each value has been read. */
static void weight_pass(const float *w, float *before, int64_t n, int copy, double *out) {
    double acc[4] = {0.0, 0.0, 0.0, 0.0}; /* sum, squares of w; sum, squares of the update */
    for (int64_t start = 0; start < n; start += BLOCK) {
        const int64_t end = n - start < BLOCK ? n : start + BLOCK;
        lanes_t s[2] = {{0}}, q[2] = {{0}}, us[2] = {{0}}, uq[2] = {{0}};
        int64_t i = start;
        for (; i + 8 <= end; i += 8) {
            for (int k = 0; k < 2; k++) {
                const lanes_t v = load(w + i + 4 * k), u = v - load(before + i + 4 * k);
                s[k] += v;
                q[k] += v * v;
                us[k] += u;
                uq[k] += u * u;
            }
            if (copy) memcpy(before + i, w + i, 8 * sizeof(float));
        }
        float f[4] = {0.0f, 0.0f, 0.0f, 0.0f};
        for (; i < end; i++) {
            const float v = w[i], u = v - before[i];
            f[0] += v;
            f[1] += v * v;
            f[2] += u;
            f[3] += u * u;
            if (copy) before[i] = v;
        }
        for (int k = 0; k < 2; k++) {
            for (int l = 0; l < 4; l++) {
                f[0] += s[k][l];
                f[1] += q[k][l];
                f[2] += us[k][l];
                f[3] += uq[k][l];
            }
        }
        for (int j = 0; j < 4; j++) acc[j] += f[j];
    }
    for (int j = 0; j < 4; j++) out[j] = acc[j];
}

/* Histogram counts of x, bins + 2 of them (under- and overflow first and last), each value's bin computed
 * in float32 exactly as probes._histograms does with torch ops: u = v * scale + offset, NaN to the
 * underflow, clamped to [0, top], truncated. Bins are worked out a block at a time (vectorised), then
 * counted into four tables in turn, so that runs of one bin do not wait on each other. */
static void histogram(const float *x, int64_t n, float scale, float offset, float top, int64_t bins,
                      int64_t *counts, int32_t *buf) {
    int64_t *table[4];
    for (int k = 0; k < 4; k++) table[k] = counts + k * (bins + 2);
    memset(counts, 0, sizeof(int64_t) * (size_t)(4 * (bins + 2)));
    for (int64_t start = 0; start < n; start += BLOCK) {
        const int64_t m = n - start < BLOCK ? n - start : BLOCK;
        const float *v = x + start;
#pragma omp simd
        for (int64_t i = 0; i < m; i++) {
            float u = v[i] * scale;
            u = u + offset;
            u = u > 0.0f ? u : 0.0f; /* NaN fails the test: underflow */
            u = u < top ? u : top;
            buf[i] = (int32_t)u;
        }
        int64_t i = 0;
        for (; i + 4 <= m; i += 4) {
            table[0][buf[i]]++;
            table[1][buf[i + 1]]++;
            table[2][buf[i + 2]]++;
            table[3][buf[i + 3]]++;
        }
        for (; i < m; i++) table[0][buf[i]]++;
    }
    for (int64_t b = 0; b < bins + 2; b++) counts[b] += table[1][b] + table[2][b] + table[3][b];
}

/* How far a tanh-like output sits toward its tails, on tanh's scale: |t|, or |2s - 1| for a sigmoid. */
static inline float tail(float v, const int sigmoid) { return sigmoid ? fabsf(2.0f * v - 1.0f) : fabsf(v); }

/* One example's row of a tanh-like layer: saturated count, alive flags, and (cells given) its map row. */
static inline int32_t bounded_row(const float *row, int64_t units, const int sigmoid, float sat, float dead,
                                  uint8_t *alive, uint8_t *cells, int64_t map_units) {
    int32_t hits = 0;
    if (cells != NULL && map_units == units) {
#pragma omp simd reduction(+ : hits)
        for (int64_t u = 0; u < units; u++) {
            const float t = tail(row[u], sigmoid);
            const uint8_t past = t > dead;
            hits += t > sat;
            alive[u] |= !past; /* NaN counts as alive: it cannot be dead */
            cells[u] = past;
        }
        return hits;
    }
#pragma omp simd reduction(+ : hits)
    for (int64_t u = 0; u < units; u++) {
        const float t = tail(row[u], sigmoid);
        hits += t > sat;
        alive[u] |= !(t > dead);
    }
    for (int64_t u = 0; cells != NULL && u < map_units; u++) {
        const float t = tail(row[u], sigmoid);
        cells[u] = t > dead;
    }
    return hits;
}

/* Saturated (tanh-like: |t| > cut) or inactive (ReLU: x <= 0) outputs, which units are "alive" (some
 * example neither saturated past the dead cut nor inactive) and the saturation map's cells. */
static int64_t activity(const item_t *it, const config_t *cfg, uint8_t *alive) {
    const float *x = (const float *)(intptr_t)it->x;
    uint8_t *cells = it->cells >= 0 ? cfg->cells + it->cells : NULL;
    const int relu = it->mode == RELU, sigmoid = it->mode == SIGMOID;
    const float sat = cfg->saturation_cut, dead = cfg->dead_cut;
    const int64_t units = it->units, inner = it->inner;
    int64_t flagged = 0;
    memset(alive, 0, (size_t)units);
    if (inner == 1) { /* (examples, units), the usual case: whole rows at a time */
        for (int64_t o = 0; o < it->outer; o++) {
            const float *row = x + o * units;
            int32_t hits = 0;
            if (relu) {
#pragma omp simd reduction(+ : hits)
                for (int64_t u = 0; u < units; u++) {
                    hits += row[u] <= 0.0f;
                    alive[u] |= row[u] > 0.0f;
                }
            } else if (sigmoid) { /* a literal 0 or 1: each call gets its own specialised loop */
                hits = bounded_row(row, units, 1, sat, dead, alive,
                                   cells != NULL && o < it->map_rows ? cells + o * it->map_units : NULL,
                                   it->map_units);
            } else {
                hits = bounded_row(row, units, 0, sat, dead, alive,
                                   cells != NULL && o < it->map_rows ? cells + o * it->map_units : NULL,
                                   it->map_units);
            }
            flagged += hits;
        }
        return flagged;
    }
    for (int64_t o = 0; o < it->outer; o++) {
        for (int64_t u = 0; u < units; u++) {
            const float *run = x + (o * units + u) * inner;
            int32_t hits = 0;
            uint8_t any = 0;
            if (relu) {
#pragma omp simd reduction(+ : hits) reduction(| : any)
                for (int64_t i = 0; i < inner; i++) {
                    hits += run[i] <= 0.0f;
                    any |= run[i] > 0.0f;
                }
            } else {
#pragma omp simd reduction(+ : hits) reduction(| : any)
                for (int64_t i = 0; i < inner; i++) {
                    const float t = tail(run[i], sigmoid);
                    hits += t > sat;
                    any |= !(t > dead); /* NaN counts as alive: it cannot be dead */
                }
                if (cells != NULL && u < it->map_units) {
                    for (int64_t i = 0; i < inner && o * inner + i < it->map_rows; i++) {
                        const float t = tail(run[i], sigmoid);
                        cells[(o * inner + i) * it->map_units + u] = t > dead;
                    }
                }
            }
            flagged += hits;
            alive[u] |= any;
        }
    }
    return flagged;
}

static int reduce_item(const item_t *it, const config_t *cfg, float *out, int64_t *counts, int32_t *buf) {
    const int64_t n = it->outer * it->units * it->inner;
    const int64_t bins = cfg->bins;
    const float *x = (const float *)(intptr_t)it->x;
    if (it->mode == COPY) { /* items run in order: an earlier item may still read what this one overwrites */
        if (x != NULL) memcpy((float *)(intptr_t)it->y, x, sizeof(float) * (size_t)n);
        return 0;
    }
    if (it->mode == UPDATE || it->mode == UPDATE_COPY) {
        double sums[4];
        weight_pass(x, (float *)(intptr_t)it->y, n, it->mode == UPDATE_COPY, sums);
        out[it->o_sum] = (float)sums[0];
        out[it->o_sq] = (float)sums[1];
        out[it->o_usum] = (float)sums[2];
        out[it->o_usq] = (float)sums[3];
        return 0;
    }
    double sum, sq;
    moments(x, n, &sum, &sq);
    if (it->o_sum >= 0) out[it->o_sum] = (float)sum;
    if (it->o_sq >= 0) out[it->o_sq] = (float)sq;
    if (it->mode == MOMENTS || x == NULL) return 0;

    const double width = (double)bins / (it->hi - it->lo);
    const float offset = (float)(1.0 - it->lo * width);
    if (it->mode == GRAD) {
        /* in units of the gradient's own std, from its float32 sums as torch computes it */
        const float total = (float)sum, squares = (float)sq;
        float var = (squares - total * total / (float)n) / (float)(n > 1 ? n - 1 : 1);
        if (var < 1e-30f) var = 1e-30f; /* NaN stays NaN: every value then lands in the underflow */
        histogram(x, n, (float)width / sqrtf(var), offset, (float)(bins + 1), bins, counts, buf);
    } else {
        const int bounded = it->mode == TANH || it->mode == SIGMOID;
        histogram(x, n, (float)width, offset, (float)(bounded ? bins : bins + 1), bins, counts, buf);
        uint8_t *alive = malloc((size_t)it->units);
        if (alive == NULL) return -1;
        out[it->o_flag] = (float)activity(it, cfg, alive);
        for (int64_t u = 0; u < it->units; u++) out[it->o_alive + u] = (float)alive[u];
        free(alive);
    }
    for (int64_t b = 0; b < bins + 2; b++) out[it->o_hist + b] = (float)counts[b];
    return 0;
}

/* Whether an item's slots lie inside a block of `size` floats: a layout bug must raise, not write past it. */
static int fits(const item_t *it, int64_t size, int64_t bins, int64_t cells) {
    const int64_t n = it->outer * it->units * it->inner;
    if (it->mode < MOMENTS || it->mode > UPDATE_COPY || it->outer < 0 || it->units < 0 || it->inner < 0 || n != it->numel)
        return 0;
    if (it->mode == COPY) return it->x != 0 && it->y != 0; /* (y's bounds are checked on the Python side) */
    if (it->mode == UPDATE || it->mode == UPDATE_COPY)
        return it->x != 0 && it->y != 0 && it->o_sum >= 0 && it->o_sum < size && it->o_sq >= 0 && it->o_sq < size &&
               it->o_usum >= 0 && it->o_usum < size && it->o_usq >= 0 && it->o_usq < size;
    if (it->o_sum >= size || it->o_sq >= size) return 0;
    if (it->mode == MOMENTS) return 1;
    if (it->o_hist < 0 || it->o_hist + bins + 2 > size) return 0;
    if (it->mode == GRAD) return 1;
    if (it->cells >= 0 && !(it->map_rows >= 0 && it->map_units >= 0 && it->map_units <= it->units &&
                            it->cells + it->map_rows * it->map_units <= cells))
        return 0;
    return it->o_flag >= 0 && it->o_flag < size && it->o_alive >= 0 && it->o_alive + it->units <= size;
}

/* reduce(items_address, count, out, cells_address, cells_size, bins, saturation_cut, dead_cut); out: a writable
 * float32 buffer (a numpy array), the block the items' slots index */
static PyObject *reduce(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (nargs != 8) {
        PyErr_SetString(PyExc_TypeError, "reduce(items, count, out, cells, cells_size, bins, saturation_cut, dead_cut)");
        return NULL;
    }
    const item_t *items = (const item_t *)(intptr_t)PyLong_AsLongLong(args[0]);
    const int64_t count = PyLong_AsLongLong(args[1]);
    const int64_t cells = PyLong_AsLongLong(args[4]);
    config_t cfg = {PyLong_AsLongLong(args[5]), (float)PyFloat_AsDouble(args[6]), (float)PyFloat_AsDouble(args[7]),
                    (uint8_t *)(intptr_t)PyLong_AsLongLong(args[3])};
    if (PyErr_Occurred()) return NULL;
    if (cfg.bins < 1 || count < 0) {
        PyErr_SetString(PyExc_ValueError, "reduce: bins must be positive and count not negative");
        return NULL;
    }
    Py_buffer view;
    if (PyObject_GetBuffer(args[2], &view, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) < 0) return NULL;
    float *out = (float *)view.buf;
    const int64_t size = (int64_t)(view.len / (Py_ssize_t)sizeof(float));
    if (view.itemsize != sizeof(float)) {
        PyBuffer_Release(&view);
        PyErr_SetString(PyExc_ValueError, "reduce: out must be a float32 buffer");
        return NULL;
    }
    for (int64_t k = 0; k < count; k++) {
        if (!fits(&items[k], size, cfg.bins, cells)) {
            PyErr_Format(PyExc_ValueError, "reduce: item %lld does not fit a block of %lld values", (long long)k,
                         (long long)size);
            PyBuffer_Release(&view);
            return NULL;
        }
    }
    int64_t *counts = malloc(sizeof(int64_t) * (size_t)(4 * (cfg.bins + 2)));
    int32_t *buf = malloc(sizeof(int32_t) * BLOCK);
    int failed = counts == NULL || buf == NULL;
    Py_BEGIN_ALLOW_THREADS
    for (int64_t k = 0; k < count && !failed; k++) failed = reduce_item(&items[k], &cfg, out, counts, buf);
    Py_END_ALLOW_THREADS
    free(counts);
    free(buf);
    PyBuffer_Release(&view);
    if (failed) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

static PyObject *s_nbytes, *s_is_contiguous, *s_data_ptr, *s_dtype; /* interned attribute names */

/* One tensor's address, where it holds exactly `numel` float32 values, contiguous (0: None, a zero tensor to
 * the kernel); -1 where it does not (the caller converts it); -2 with an exception set. */
static int64_t address(PyObject *t, int64_t numel, PyObject *float32) {
    if (t == Py_None) return 0;
    if (torch_api != NULL) return torch_api->address(t, numel);
    PyObject *v = PyObject_GetAttr(t, s_dtype);
    if (v == NULL) return -2;
    Py_DECREF(v); /* (torch's dtypes are singletons: compared by identity) */
    if (v != float32) return -1;
    v = PyObject_GetAttr(t, s_nbytes);
    if (v == NULL) return -2;
    const long long nbytes = PyLong_AsLongLong(v);
    Py_DECREF(v);
    if (nbytes == -1 && PyErr_Occurred()) return -2;
    if (nbytes != 4 * numel) return -1;
    v = PyObject_CallMethodNoArgs(t, s_is_contiguous);
    if (v == NULL) return -2;
    const int contiguous = v == Py_True;
    Py_DECREF(v);
    if (!contiguous) return -1;
    v = PyObject_CallMethodNoArgs(t, s_data_ptr);
    if (v == NULL) return -2;
    const long long at = PyLong_AsLongLong(v);
    Py_DECREF(v);
    return at == -1 && PyErr_Occurred() ? -2 : at;
}

/* addresses(items_address, count, tensors, float32): each tensor's address into its item's x, where it is as the
 * kernel reads it; returns the index of the first that is not (the caller then goes through them itself,
 * converting), or -1 when all were. */
static PyObject *addresses(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (nargs != 4 || !PyList_Check(args[2])) {
        PyErr_SetString(PyExc_TypeError, "addresses(items, count, tensors: list, float32)");
        return NULL;
    }
    item_t *items = (item_t *)(intptr_t)PyLong_AsLongLong(args[0]);
    const int64_t count = PyLong_AsLongLong(args[1]);
    if (PyErr_Occurred()) return NULL;
    if (PyList_GET_SIZE(args[2]) != count) {
        PyErr_SetString(PyExc_ValueError, "addresses: one tensor per item");
        return NULL;
    }
    for (int64_t k = 0; k < count; k++) {
        const int64_t at = address(PyList_GET_ITEM(args[2], k), items[k].numel, args[3]);
        if (at == -2) return NULL;
        if (at == -1) return PyLong_FromLongLong(k);
        items[k].x = at;
    }
    return PyLong_FromLong(-1);
}

/* The process-wide forward hook's common case, as probes.Recorder._replay does it in Python: a call that repeats
 * the record the last pass made at this place is kept here; everything else goes to the layer's own hook. */
typedef struct {
    PyObject_HEAD
    PyObject *recorder, *table, *tensor, *grad_enabled, *stack_limit, *flush_limit, *fallback, *linear, *root,
        *ordered_dict;
    PyObject *fields; /* the recorder's __dict__ */
} replay_t;

static PyObject *s_specs, *s_matched, *s_template, *s_producers, *s_shape, *s_numel, *s_protected,
    *s_copy, *s_name, *s_entries, *s_version, *s_outs, *s_unprotected, *s_requires_grad, *s_grad_cells,
    *s_grad_outs, *s_grad_at, *s_grad_versions, *s_pending, *s_flush, *s_batchnorm, *s_training, *s_bn_batches,
    *s_bias_before_norm, *s_parameters, *s_bias, *s_is_floating_point, *s_output_shape, *s_output_name,
    *s_output_params, *s_trace_all, *s_cache, *s_root_post, *s_append, *s_backward_hooks, *s_grad_fn, *s_nnvitals,
    *s_register_hook_dict, *s_register_hook;

/* The Replay holds its recorder, which holds it (in its cache): a cycle the garbage collector must see through. */
#define REPLAY_FIELDS(DO)                                                                                               \
    DO(self->recorder);                                                                                                \
    DO(self->table);                                                                                                   \
    DO(self->tensor);                                                                                                  \
    DO(self->grad_enabled);                                                                                            \
    DO(self->stack_limit);                                                                                             \
    DO(self->flush_limit);                                                                                             \
    DO(self->fallback);                                                                                                \
    DO(self->linear);                                                                                                  \
    DO(self->root);                                                                                                    \
    DO(self->ordered_dict);                                                                                            \
    DO(self->fields)

static int replay_traverse(replay_t *self, visitproc visit, void *arg) {
    REPLAY_FIELDS(Py_VISIT);
    return 0;
}

static int replay_clear(replay_t *self) {
    REPLAY_FIELDS(Py_CLEAR);
    return 0;
}

static void replay_dealloc(replay_t *self) {
    PyObject_GC_UnTrack(self);
    replay_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* Replay(recorder, table, torch.Tensor, torch.is_grad_enabled, STACK_LIMIT, FLUSH_ELEMENTS, hook, linear types,
 *        model, collections.OrderedDict) */
static PyObject *replay_new(PyTypeObject *type, PyObject *args, PyObject *kwargs) {
    PyObject *recorder, *table, *tensor, *grad_enabled, *stack_limit, *flush_limit, *fallback, *linear, *root,
        *ordered_dict;
    if (kwargs != NULL || !PyArg_ParseTuple(args, "OO!O!OO!O!OO!OO!", &recorder, &PyDict_Type, &table, &PyType_Type,
                                            &tensor, &grad_enabled, &PyLong_Type, &stack_limit, &PyLong_Type,
                                            &flush_limit, &fallback, &PyTuple_Type, &linear, &root, &PyType_Type,
                                            &ordered_dict))
        return NULL;
    replay_t *self = (replay_t *)type->tp_alloc(type, 0);
    if (self == NULL) return NULL;
    PyObject *all[10] = {recorder, table, tensor, grad_enabled, stack_limit, flush_limit, fallback, linear, root,
                         ordered_dict};
    for (int i = 0; i < 10; i++) Py_INCREF(all[i]);
    self->recorder = recorder, self->table = table, self->tensor = tensor, self->grad_enabled = grad_enabled;
    self->stack_limit = stack_limit, self->flush_limit = flush_limit, self->fallback = fallback;
    self->linear = linear, self->root = root, self->ordered_dict = ordered_dict;
    self->fields = PyObject_GenericGetDict(recorder, NULL);
    if (self->fields == NULL) {
        Py_DECREF(self);
        return NULL;
    }
    return (PyObject *)self;
}

/* an attribute as a new reference (released at `done`), or NULL with an exception set */
#define GET(obj, name) PyObject_GetAttr((obj), (name))

/* A field of one of probes' own plain objects (the Recorder, a _Spec), read from the instance's dict without the type
 * lookup a generic getattr makes first (neither class defines a descriptor for these names); a new reference, or NULL
 * with an exception set. */
static PyObject *in_dict(PyObject *dict, PyObject *obj, PyObject *name) {
    PyObject *v = PyDict_GetItemWithError(dict, name);
    Py_XINCREF(v);
    return v != NULL || PyErr_Occurred() ? v : PyObject_GetAttr(obj, name); /* (else: a class attribute, or the error) */
}

static PyObject *field(PyObject *obj, PyObject *name) {
    PyObject *dict = PyObject_GenericGetDict(obj, NULL);
    if (dict == NULL) return NULL;
    PyObject *v = in_dict(dict, obj, name);
    Py_DECREF(dict);
    return v;
}

/* The recorder's fields, through the dict the Replay keeps of it */
#define REC(name) in_dict(self->fields, self->recorder, (name))
#define SET_REC(name, value) PyDict_SetItem(self->fields, (name), (value))

/* A tensor's version counter (Tensor._version) as a new reference, or NULL with an exception set. */
static PyObject *version_of(PyObject *t) {
    const int64_t v = torch_api != NULL ? torch_api->tensor_version(t) : -1;
    return v >= 0 ? PyLong_FromLongLong(v) : PyObject_GetAttr(t, s_version);
}

/* Whether tensor t is still at version `then` (a Python int): 1 or 0, -1 with an exception set. */
static int at_version(PyObject *t, PyObject *then) {
    const int64_t v = torch_api != NULL ? torch_api->tensor_version(t) : -1;
    if (v >= 0) {
        const long long was = PyLong_AsLongLong(then);
        return was == -1 && PyErr_Occurred() ? -1 : v == was;
    }
    PyObject *now = PyObject_GetAttr(t, s_version);
    if (now == NULL) return -1;
    const int same = PyObject_RichCompareBool(now, then, Py_EQ);
    Py_DECREF(now);
    return same;
}

/* A list autograd will append the output's gradient to, as probes._grad_cell makes it: a C++ hook on its grad_fn
 * where nnvitals._autograd lends one; else a hook in a new hooks dict of the output, registered with its grad_fn as
 * Tensor.register_hook does (without a handle), or register_hook itself where the output already has hooks. A new
 * reference, or NULL with an exception set. */
static PyObject *grad_cell(replay_t *self, PyObject *out) {
    PyObject *cell = PyList_New(0);
    if (cell != NULL && torch_api != NULL) {
        const int kept = torch_api->keep_grad(out, cell);
        if (kept < 0) Py_CLEAR(cell);
        if (kept != 0) return cell;
    }
    PyObject *append = cell != NULL ? PyObject_GetAttr(cell, s_append) : NULL;
    PyObject *hooks = append != NULL ? GET(out, s_backward_hooks) : NULL;
    PyObject *grad_fn = hooks != NULL ? GET(out, s_grad_fn) : NULL, *r = NULL;
    if (grad_fn == NULL) goto done;
    if (hooks == Py_None && grad_fn != Py_None) {
        PyObject *fresh = PyObject_CallNoArgs(self->ordered_dict);
        if (fresh != NULL && PyObject_SetItem(fresh, s_nnvitals, append) == 0 &&
            PyObject_SetAttr(out, s_backward_hooks, fresh) == 0)
            r = PyObject_CallMethodOneArg(grad_fn, s_register_hook_dict, out);
        Py_XDECREF(fresh);
    } else {
        r = PyObject_CallMethodOneArg(out, s_register_hook, append);
    }
done:
    Py_XDECREF(append);
    Py_XDECREF(hooks);
    Py_XDECREF(grad_fn);
    if (r == NULL) {
        Py_XDECREF(cell);
        return NULL;
    }
    Py_DECREF(r);
    return cell;
}

/* The record (output, name, module, place) whose output is `t`, from the recorder's producers (borrowed); NULL
 * where there is none, or with an exception set. */
static PyObject *producer_of(PyObject *producers, PyObject *t) {
    PyObject *key = PyLong_FromVoidPtr(t);
    if (key == NULL) return NULL;
    PyObject *prod = PyDict_GetItemWithError(producers, key);
    Py_DECREF(key);
    return prod != NULL && PyTuple_Check(prod) && PyTuple_GET_SIZE(prod) == 4 && PyTuple_GET_ITEM(prod, 0) == t
               ? prod
               : NULL;
}

/* A replayed BatchNorm's checks, as Recorder._replayed_batchnorm does them: in training with a batch, its batch
 * size and, when the layer feeding it is a linear one with a bias, that bias (wasted); else (a mode to report)
 * that method itself. 0, or -1 with an exception set. */
static int replay_batchnorm(replay_t *self, PyObject *entry, PyObject *spec, PyObject *module, PyObject *shape,
                            PyObject *prod, PyObject *x_from) {
    PyObject *rec = self->recorder, *training = GET(module, s_training);
    if (training == NULL) return -1;
    const int in_training = training == Py_True;
    Py_DECREF(training);
    if (!in_training || !PyTuple_Check(shape) || PyTuple_GET_SIZE(shape) < 2) {
        PyObject *r = PyObject_CallMethodObjArgs(rec, s_batchnorm, entry, spec, module, prod ? prod : Py_None,
                                                 x_from, NULL);
        Py_XDECREF(r);
        return r == NULL ? -1 : 0;
    }
    PyObject *name = PyTuple_GET_ITEM(entry, 2), *batches = REC(s_bn_batches);
    int failed = batches == NULL || PyDict_SetItem(batches, name, PyTuple_GET_ITEM(shape, 0)) < 0;
    Py_XDECREF(batches);
    if (failed || prod == NULL) return failed ? -1 : 0;
    PyObject *before = PyTuple_GET_ITEM(prod, 2); /* (output, name, module, place) of the layer feeding it */
    const int linear = PyObject_IsInstance(before, self->linear);
    if (linear <= 0) return linear;
    PyObject *params = GET(before, s_parameters);
    if (params == NULL) return -1;
    PyObject *bias = PyDict_Check(params) ? PyDict_GetItemWithError(params, s_bias) : NULL; /* borrowed */
    failed = bias == NULL && PyErr_Occurred();
    if (!failed && bias != NULL && bias != Py_None) {
        PyObject *pair = PyTuple_Pack(2, PyTuple_GET_ITEM(prod, 1), name), *found = REC(s_bias_before_norm);
        failed = pair == NULL || found == NULL || PyList_Append(found, pair) < 0;
        Py_XDECREF(pair);
        Py_XDECREF(found);
    }
    Py_DECREF(params);
    return failed ? -1 : 0;
}

/* 1: kept; 0: not the template's record (the layer's own hook works it out); -1: an exception */
static int replay_keep(replay_t *self, PyObject *module, PyObject *args, PyObject *out, PyObject *entry) {
    PyObject *rec = self->recorder;
    int result = -1;
    PyObject *specs = NULL, *matched = NULL, *template = NULL, *producers = NULL, *shape = NULL, *enabled = NULL,
             *prod = NULL, *numel = NULL, *protected_ = NULL, *copy = NULL, *version = NULL,
             *needs = NULL, *pending = NULL, *total = NULL, *items = NULL;
    specs = REC(s_specs);
    matched = REC(s_matched);
    template = REC(s_template);
    if (specs == NULL || matched == NULL || template == NULL) goto done;
    const Py_ssize_t index = PyList_GET_SIZE(specs);
    if (!PyList_Check(template) || PyLong_AsSsize_t(matched) != index || index >= PyList_GET_SIZE(template) ||
        Py_TYPE(out) != (PyTypeObject *)self->tensor) {
        result = PyErr_Occurred() ? -1 : 0;
        goto done;
    }
    PyObject *then = PyList_GET_ITEM(template, index); /* (module, spec, count, x_from) */
    if (!PyTuple_Check(then) || PyTuple_GET_SIZE(then) != 4 || PyTuple_GET_ITEM(then, 0) != module) {
        result = 0;
        goto done;
    }
    PyObject *spec = PyTuple_GET_ITEM(then, 1), *x_from = PyTuple_GET_ITEM(then, 3);
    PyObject *x = PyTuple_GET_SIZE(args) > 0 ? PyTuple_GET_ITEM(args, 0) : Py_None;
    producers = REC(s_producers);
    shape = field(spec, s_shape); /* (the output's too, where they are the same) */
    if (producers == NULL || shape == NULL) goto done;
    int same_shape = torch_api != NULL ? torch_api->same_shape(out, shape) : -1;
    if (same_shape < 0) {
        PyObject *size = GET(out, s_shape);
        same_shape = size != NULL ? PyObject_RichCompareBool(size, shape, Py_EQ) : -1;
        Py_XDECREF(size);
        if (same_shape < 0) goto done;
    }
    enabled = PyObject_CallNoArgs(self->grad_enabled);
    if (enabled == NULL) goto done;
    prod = producer_of(producers, x);
    if (prod == NULL && PyErr_Occurred()) goto done;
    const long fed_by = prod != NULL ? PyLong_AsLong(PyTuple_GET_ITEM(prod, 3)) : -1;
    if (!same_shape || enabled != Py_True || fed_by != PyLong_AsLong(x_from)) {
        result = PyErr_Occurred() ? -1 : 0;
        goto done;
    }
    /* What the Python side does itself: a copy of an output seen changed in place, a large or traced output,
     * a BatchNorm's checks (its mode, batch size and the bias before it). */
    numel = field(spec, s_numel);
    protected_ = field(spec, s_protected);
    copy = field(spec, s_copy);
    if (numel == NULL || protected_ == NULL || copy == NULL) goto done;
    const int large = PyObject_RichCompareBool(numel, self->stack_limit, Py_GE);
    if (large < 0) goto done;
    if ((protected_ != Py_True && copy == Py_True) || large) {
        result = 0; /* the Python hook keeps it (a copy, or reduced as it comes) */
        goto done;
    }
    if (PyTuple_GET_ITEM(entry, 3) == Py_True && replay_batchnorm(self, entry, spec, module, shape,
                                                                  fed_by >= 0 ? prod : NULL, x_from) < 0)
        goto done;
    /* keep it: as Recorder._keep does */
    PyObject *new_matched = PyLong_FromSsize_t(index + 1);
    if (new_matched == NULL || SET_REC(s_matched, new_matched) < 0) {
        Py_XDECREF(new_matched);
        goto done;
    }
    Py_DECREF(new_matched);
    if (PyList_Append(specs, spec) < 0) goto done;
    items = REC(s_entries);
    if (items == NULL || PyList_Append(items, then) < 0) goto done;
    Py_CLEAR(items);
    version = version_of(out);
    PyObject *position = PyLong_FromSsize_t(index);
    if (version == NULL || position == NULL) {
        Py_XDECREF(position);
        goto done;
    }
    items = REC(s_outs);
    int failed = items == NULL || PyList_Append(items, out) < 0;
    Py_CLEAR(items);
    if (!failed && protected_ != Py_True) {
        PyObject *row = PyTuple_Pack(4, position, out, version, Py_False);
        items = REC(s_unprotected);
        failed = row == NULL || items == NULL || PyList_Append(items, row) < 0;
        Py_XDECREF(row);
        Py_CLEAR(items);
    }
    PyObject *name = failed ? NULL : field(spec, s_name);
    PyObject *made = name != NULL ? PyTuple_Pack(4, out, name, module, position) : NULL;
    Py_XDECREF(name);
    PyObject *out_key = made != NULL ? PyLong_FromVoidPtr(out) : NULL;
    failed = out_key == NULL || PyDict_SetItem(producers, out_key, made) < 0;
    Py_XDECREF(made);
    Py_XDECREF(out_key);
    if (!failed) {
        const int lent_needs = torch_api != NULL ? torch_api->requires_grad(out) : -1;
        needs = lent_needs >= 0 ? Py_NewRef(lent_needs ? Py_True : Py_False) : GET(out, s_requires_grad);
        failed = needs == NULL;
    }
    if (!failed && needs == Py_True) {
        PyObject *cell = grad_cell(self, out);
        failed = cell == NULL;
        PyObject *lists[4] = {s_grad_outs, s_grad_cells, s_grad_at, s_grad_versions},
                 *values[4] = {out, cell, position, version};
        for (int i = 0; i < 4 && !failed; i++) {
            items = REC(lists[i]);
            failed = items == NULL || PyList_Append(items, values[i]) < 0;
            Py_CLEAR(items);
        }
        Py_XDECREF(cell);
    }
    Py_DECREF(position);
    if (failed) goto done;
    pending = REC(s_pending);
    total = pending != NULL ? PyNumber_Add(pending, numel) : NULL;
    if (total == NULL || SET_REC(s_pending, total) < 0) goto done;
    const int over = PyObject_RichCompareBool(total, self->flush_limit, Py_GT);
    if (over < 0) goto done;
    if (over) {
        PyObject *r = PyObject_CallMethodNoArgs(rec, s_flush);
        if (r == NULL) goto done;
        Py_DECREF(r);
    }
    result = 1;
done:
    Py_XDECREF(specs);
    Py_XDECREF(matched);
    Py_XDECREF(template);
    Py_XDECREF(producers);
    Py_XDECREF(shape);
    Py_XDECREF(enabled);
    Py_XDECREF(numel);
    Py_XDECREF(protected_);
    Py_XDECREF(copy);
    Py_XDECREF(version);
    Py_XDECREF(needs);
    Py_XDECREF(pending);
    Py_XDECREF(total);
    Py_XDECREF(items);
    return result;
}
/* The model's own call returning, as Recorder._root_post takes it, where no input is a floating-point tensor (to be
 * checked for NaN/Inf with torch ops) and the output's layer parameters are known: 0; 1 where that method is
 * needed; -1 with an exception set. */
static int replay_root(replay_t *self, PyObject *inputs, PyObject *call_kwargs, PyObject *out) {
    PyObject *values = call_kwargs != NULL ? PyDict_Values(call_kwargs) : NULL;
    if (call_kwargs != NULL && values == NULL) return -1;
    int result = 0;
    for (int part = 0; part < 2 && result == 0; part++) {
        PyObject *seq = part == 0 ? inputs : values;
        for (Py_ssize_t i = 0; seq != NULL && i < PySequence_Fast_GET_SIZE(seq) && result == 0; i++) {
            PyObject *a = PySequence_Fast_GET_ITEM(seq, i);
            if (!PyObject_TypeCheck(a, (PyTypeObject *)self->tensor)) continue;
            PyObject *dtype = GET(a, s_dtype), *floating = dtype != NULL ? GET(dtype, s_is_floating_point) : NULL;
            result = floating == NULL ? -1 : floating == Py_False ? 0 : 1;
            Py_XDECREF(dtype);
            Py_XDECREF(floating);
        }
    }
    Py_XDECREF(values);
    if (result != 0) return result;
    PyObject *enabled = PyObject_CallNoArgs(self->grad_enabled);
    if (enabled == NULL) return -1;
    const int grad = enabled == Py_True;
    Py_DECREF(enabled);
    if (!grad || !PyObject_TypeCheck(out, (PyTypeObject *)self->tensor)) return 0;
    PyObject *known = REC(s_output_shape), *traced = known != NULL ? REC(s_trace_all) : NULL;
    if (traced == NULL) {
        Py_XDECREF(known);
        return -1;
    }
    const int measured = known != Py_None, plain = traced == Py_False;
    Py_DECREF(known);
    Py_DECREF(traced);
    if (measured) return 0; /* (the first call of the model to return is the one measured) */
    if (!plain) return 1;
    PyObject *size = GET(out, s_shape), *shape = size != NULL ? PySequence_Tuple(size) : NULL;
    Py_XDECREF(size);
    PyObject *needs = shape != NULL ? GET(out, s_requires_grad) : NULL, *params = NULL, *name = Py_None;
    if (needs == NULL) goto error;
    if (needs == Py_True) { /* the output layer's parameters, as worked out for this shape before */
        PyObject *cache = REC(s_cache), *key = Py_BuildValue("(sO)", "output", shape);
        params = cache != NULL && key != NULL ? PyDict_GetItemWithError(cache, key) : NULL; /* borrowed */
        Py_XINCREF(params);
        Py_XDECREF(cache);
        Py_XDECREF(key);
        if (params == NULL) {
            if (PyErr_Occurred()) goto error;
            Py_DECREF(needs);
            Py_DECREF(shape);
            return 1;
        }
    }
    PyObject *producers = REC(s_producers), *prod = producers != NULL ? producer_of(producers, out) : NULL;
    if (prod == NULL && PyErr_Occurred()) {
        Py_XDECREF(producers);
        goto error;
    }
    if (prod != NULL)
        name = PyTuple_GET_ITEM(prod, 1);
    Py_INCREF(name);
    Py_XDECREF(producers);
    int failed = SET_REC(s_output_shape, shape) < 0 || SET_REC(s_output_name, name) < 0 ||
                 (params != NULL && SET_REC(s_output_params, params) < 0);
    Py_DECREF(name);
    Py_XDECREF(params);
    Py_DECREF(needs);
    Py_DECREF(shape);
    return failed ? -1 : 0;
error:
    Py_XDECREF(needs);
    Py_XDECREF(shape);
    Py_XDECREF(params);
    return -1;
}

/* hook(module, args[, kwargs], out), as torch calls a process-wide forward hook registered with its keyword
 * arguments (without them when forward raised): the call kept here, or handed to the Python hook (the
 * `hook` argument of Replay); then, for the model itself, what Recorder._root_post does. */
static PyObject *replay_call(replay_t *self, PyObject *args, PyObject *kwargs) {
    PyObject *module, *inputs, *third, *fourth = NULL;
    if (kwargs != NULL || !PyArg_UnpackTuple(args, "hook", 3, 4, &module, &inputs, &third, &fourth)) return NULL;
    if (self->recorder == NULL) Py_RETURN_NONE; /* (cleared by the garbage collector) */
    PyObject *call_kwargs = fourth != NULL ? third : NULL, *out = fourth != NULL ? fourth : third;
    if (!PyTuple_Check(inputs) || (call_kwargs != NULL && !PyDict_Check(call_kwargs))) {
        PyErr_SetString(PyExc_TypeError, "hook(module, args: tuple[, kwargs: dict], output)");
        return NULL;
    }
    PyObject *key = PyLong_FromVoidPtr(module);
    if (key == NULL) return NULL;
    PyObject *entry = PyDict_GetItemWithError(self->table, key); /* (module, hook, name, is_batchnorm) */
    Py_DECREF(key);
    if (entry == NULL && PyErr_Occurred()) return NULL;
    if (entry != NULL && PyTuple_Check(entry) && PyTuple_GET_SIZE(entry) == 4 && PyTuple_GET_ITEM(entry, 0) == module) {
        Py_INCREF(entry);
        const int kept = replay_keep(self, module, inputs, out, entry);
        Py_DECREF(entry);
        if (kept < 0) return NULL;
        if (!kept) {
            PyObject *r = PyObject_CallFunctionObjArgs(self->fallback, module, inputs, out, NULL);
            if (r == NULL) return NULL;
            Py_DECREF(r);
        }
    }
    if (module != self->root) Py_RETURN_NONE;
    const int root = replay_root(self, inputs, call_kwargs, out);
    if (root < 0) return NULL;
    if (root == 0) Py_RETURN_NONE;
    PyObject *empty = call_kwargs == NULL ? PyDict_New() : NULL;
    if (call_kwargs == NULL && empty == NULL) return NULL;
    PyObject *r = PyObject_CallMethodObjArgs(self->recorder, s_root_post, module, inputs,
                                             call_kwargs != NULL ? call_kwargs : empty, out, NULL);
    Py_XDECREF(empty);
    return r;
}

static PyTypeObject replay_type = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "nnvitals._kernel.Replay",
    .tp_basicsize = sizeof(replay_t),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_new = replay_new,
    .tp_dealloc = (destructor)replay_dealloc,
    .tp_traverse = (traverseproc)replay_traverse,
    .tp_clear = (inquiry)replay_clear,
    .tp_call = (ternaryfunc)replay_call,
    .tp_doc = "Replay(recorder, table, torch.Tensor, torch.is_grad_enabled, STACK_LIMIT, FLUSH_ELEMENTS, hook, linear types, "
               "model)",
};

/* Watching a pass without a process-wide hook. While any forward hook is registered process-wide, torch calls every
 * module through its slow path (some fifty lines of Python a call); `Watch` instead gives each watched module, for
 * the length of the model's own call, an instance `forward` (a `Forward`) that calls the module's forward and hands
 * the call to the Replay, as the process-wide hook would have. Only the model's own call then takes the slow path,
 * for its pre-hook (the Watch: set them) and forward hook (`Watch.leave`: take them away again, also where forward
 * raised). Recorder uses it for a pass only after it has seen a pass record nothing outside the model's own call. */
typedef struct {
    PyObject_HEAD
    PyObject *module, *call, *hook; /* the module, its forward as it was, the Replay */
} forward_t;

static PyObject *forward_call(forward_t *self, PyObject *args, PyObject *kwargs) {
    PyObject *out = PyObject_Call(self->call, args, kwargs);
    if (out == NULL) return NULL;
    PyObject *r = PyObject_CallFunctionObjArgs(self->hook, self->module, args, out, NULL);
    if (r == NULL) {
        Py_DECREF(out);
        return NULL;
    }
    Py_DECREF(r);
    return out;
}

static int forward_traverse(forward_t *self, visitproc visit, void *arg) {
    Py_VISIT(self->module);
    Py_VISIT(self->call);
    Py_VISIT(self->hook);
    return 0;
}

static int forward_clear(forward_t *self) {
    Py_CLEAR(self->module);
    Py_CLEAR(self->call);
    Py_CLEAR(self->hook);
    return 0;
}

static void forward_dealloc(forward_t *self) {
    PyObject_GC_UnTrack(self);
    forward_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyTypeObject forward_type = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "nnvitals._kernel.Forward",
    .tp_basicsize = sizeof(forward_t),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_call = (ternaryfunc)forward_call,
    .tp_traverse = (traverseproc)forward_traverse,
    .tp_clear = (inquiry)forward_clear,
    .tp_dealloc = (destructor)forward_dealloc,
    .tp_doc = "A watched module's forward for one call of the model: the module's own, then the Replay.",
};

typedef struct {
    PyObject_HEAD
    PyObject *dicts;  /* the watched modules' __dict__s, in order (a tuple) */
    PyObject *modules; /* the modules (a tuple) */
    PyObject *hook;    /* the Replay */
    PyObject *set;     /* per module while set: (its Forward, what __dict__["forward"] was, or this Watch where it
                        * had none); NULL between the model's calls */
    Py_ssize_t depth;  /* calls of the model under way (a model may call itself) */
} watch_t;

static PyObject *s_forward;

/* Each module's __dict__["forward"] back to what it was, where it is still the Forward set (0; -1 on an error, after
 * putting back all the others). */
static int watch_unset(watch_t *self) {
    int failed = 0;
    for (Py_ssize_t i = 0; self->set != NULL && i < PyTuple_GET_SIZE(self->dicts); i++) {
        PyObject *pair = PyList_GET_ITEM(self->set, i); /* (Forward, before); None: not set (an error midway) */
        if (pair == Py_None) continue;
        PyObject *dict = PyTuple_GET_ITEM(self->dicts, i), *mine = PyTuple_GET_ITEM(pair, 0),
                 *before = PyTuple_GET_ITEM(pair, 1);
        PyObject *now = PyDict_GetItemWithError(dict, s_forward); /* borrowed */
        if (now == mine) /* (else something set its own forward since: left as it is) */
            failed |= (before == (PyObject *)self ? PyDict_DelItem(dict, s_forward)
                                                  : PyDict_SetItem(dict, s_forward, before)) < 0;
        else if (now == NULL && PyErr_Occurred())
            failed = 1;
    }
    Py_CLEAR(self->set);
    return failed ? -1 : 0;
}

/* The model's forward pre-hook: on its outermost call, each watched module's forward wrapped. */
static PyObject *watch_call(watch_t *self, PyObject *args, PyObject *kwargs) {
    (void)args;
    (void)kwargs;
    if (self->depth++ > 0) Py_RETURN_NONE;
    const Py_ssize_t n = PyTuple_GET_SIZE(self->dicts);
    self->set = PyList_New(n);
    if (self->set == NULL) return NULL;
    for (Py_ssize_t i = 0; i < n; i++) {
        Py_INCREF(Py_None);
        PyList_SET_ITEM(self->set, i, Py_None);
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *dict = PyTuple_GET_ITEM(self->dicts, i), *module = PyTuple_GET_ITEM(self->modules, i);
        PyObject *before = PyDict_GetItemWithError(dict, s_forward); /* borrowed: a forward set on the instance */
        if (before == NULL && PyErr_Occurred()) goto error;
        PyObject *call = before != NULL ? Py_NewRef(before) : PyObject_GetAttr(module, s_forward);
        if (call == NULL) goto error;
        forward_t *mine = PyObject_GC_New(forward_t, &forward_type);
        if (mine == NULL) {
            Py_DECREF(call);
            goto error;
        }
        mine->module = Py_NewRef(module), mine->call = call, mine->hook = Py_NewRef(self->hook);
        PyObject_GC_Track(mine);
        /* (the Watch itself marks "no forward on the instance before") */
        PyObject *pair = PyTuple_Pack(2, (PyObject *)mine, before != NULL ? before : (PyObject *)self);
        const int failed = pair == NULL || PyDict_SetItem(dict, s_forward, (PyObject *)mine) < 0;
        Py_DECREF(mine);
        if (failed) {
            Py_XDECREF(pair);
            goto error;
        }
        PyList_SetItem(self->set, i, pair); /* (steals pair; after the dict holds the Forward, so unset finds it) */
    }
    Py_RETURN_NONE;
error:
    self->depth--;
    {
        PyObject *type, *value, *traceback;
        PyErr_Fetch(&type, &value, &traceback);
        watch_unset(self);
        PyErr_Restore(type, value, traceback);
    }
    return NULL;
}

/* The model's forward hook (registered to be called also where forward raised): on the outermost call returning,
 * the modules' forwards as they were. */
static PyObject *watch_leave(watch_t *self, PyObject *args) {
    (void)args;
    if (self->depth == 0 || --self->depth > 0) Py_RETURN_NONE;
    if (watch_unset(self) < 0) return NULL;
    Py_RETURN_NONE;
}

/* Watch(modules, replay) */
static PyObject *watch_new(PyTypeObject *type, PyObject *args, PyObject *kwargs) {
    PyObject *modules, *hook;
    if (kwargs != NULL || !PyArg_ParseTuple(args, "O!O", &PyTuple_Type, &modules, &hook)) return NULL;
    PyObject *dicts = PyTuple_New(PyTuple_GET_SIZE(modules));
    if (dicts == NULL) return NULL;
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(modules); i++) {
        PyObject *dict = PyObject_GenericGetDict(PyTuple_GET_ITEM(modules, i), NULL);
        if (dict == NULL) {
            Py_DECREF(dicts);
            return NULL;
        }
        PyTuple_SET_ITEM(dicts, i, dict);
    }
    watch_t *self = (watch_t *)type->tp_alloc(type, 0);
    if (self == NULL) {
        Py_DECREF(dicts);
        return NULL;
    }
    self->dicts = dicts, self->modules = Py_NewRef(modules), self->hook = Py_NewRef(hook);
    self->set = NULL, self->depth = 0;
    return (PyObject *)self;
}

static int watch_traverse(watch_t *self, visitproc visit, void *arg) {
    Py_VISIT(self->dicts);
    Py_VISIT(self->modules);
    Py_VISIT(self->hook);
    Py_VISIT(self->set);
    return 0;
}

static int watch_clear(watch_t *self) {
    Py_CLEAR(self->dicts);
    Py_CLEAR(self->modules);
    Py_CLEAR(self->hook);
    Py_CLEAR(self->set);
    return 0;
}

static void watch_dealloc(watch_t *self) {
    PyObject_GC_UnTrack(self);
    watch_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyMethodDef watch_methods[] = {
    {"leave", (PyCFunction)watch_leave, METH_VARARGS,
     "leave(model, args, output): the model's forward hook, putting the modules' forwards back on its outermost call."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject watch_type = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "nnvitals._kernel.Watch",
    .tp_basicsize = sizeof(watch_t),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_new = watch_new,
    .tp_call = (ternaryfunc)watch_call,
    .tp_methods = watch_methods,
    .tp_traverse = (traverseproc)watch_traverse,
    .tp_clear = (inquiry)watch_clear,
    .tp_dealloc = (destructor)watch_dealloc,
    .tp_doc = "Watch(modules, replay): the model's forward pre-hook (this object) and forward hook (`leave`) that give "
              "the modules, for each call of the model, a forward handing their calls to the Replay.",
};

/* take_grads(cells, outputs, versions): the gradients autograd handed these outputs, each taken from its cell (see
 * grad_cell), when each came exactly once and no output has changed since it was recorded (its version then);
 * else None, and nothing is taken (Recorder.collect then goes through them one by one). */
static PyObject *take_grads(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (nargs != 3 || !PyList_Check(args[0]) || !PyList_Check(args[1]) || !PyList_Check(args[2]) ||
        PyList_GET_SIZE(args[0]) != PyList_GET_SIZE(args[1]) || PyList_GET_SIZE(args[1]) != PyList_GET_SIZE(args[2])) {
        PyErr_SetString(PyExc_TypeError, "take_grads(cells: list, outputs: list, versions: list, of one length)");
        return NULL;
    }
    const Py_ssize_t n = PyList_GET_SIZE(args[0]);
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *cell = PyList_GET_ITEM(args[0], i);
        if (!PyList_Check(cell) || PyList_GET_SIZE(cell) != 1) Py_RETURN_NONE;
        const int same = at_version(PyList_GET_ITEM(args[1], i), PyList_GET_ITEM(args[2], i));
        if (same < 0) return NULL;
        if (!same) Py_RETURN_NONE;
    }
    PyObject *grads = PyList_New(n);
    if (grads == NULL) return NULL;
    for (Py_ssize_t i = 0; i < n; i++) { /* (each cell's one gradient moved to the list) */
        PyObject *cell = PyList_GET_ITEM(args[0], i), *g = PyList_GET_ITEM(cell, 0);
        Py_INCREF(g);
        PyList_SET_ITEM(grads, i, g);
        if (PyList_SetSlice(cell, 0, 1, NULL) < 0) {
            Py_DECREF(grads);
            return NULL;
        }
    }
    return grads;
}

/* as_recorded(rows): whether every (place, output, version, copied) row kept without a copy has an output still at
 * the version it had when recorded (Recorder._buffered's usual case: nothing to mark). */
static PyObject *as_recorded(PyObject *self, PyObject *rows) {
    (void)self;
    if (!PyList_Check(rows)) {
        PyErr_SetString(PyExc_TypeError, "as_recorded(rows: list)");
        return NULL;
    }
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(rows); i++) {
        PyObject *row = PyList_GET_ITEM(rows, i);
        if (!PyTuple_Check(row) || PyTuple_GET_SIZE(row) != 4 || PyTuple_GET_ITEM(row, 3) != Py_False)
            Py_RETURN_FALSE;
        const int same = at_version(PyTuple_GET_ITEM(row, 1), PyTuple_GET_ITEM(row, 2));
        if (same < 0) return NULL;
        if (!same) Py_RETURN_FALSE;
    }
    Py_RETURN_TRUE;
}

/* borrow(flag): use nnvitals._autograd's functions (True, the default where it was built) or torch's Python API
 * (False, what tests and benchmarks compare with); returns whether they were lent. */
static PyObject *borrow(PyObject *self, PyObject *flag) {
    (void)self;
    const int on = PyObject_IsTrue(flag);
    if (on < 0) return NULL;
    torch_api = on ? lent : NULL;
    return PyBool_FromLong(lent != NULL);
}

static PyMethodDef methods[] = {
    {"borrow", borrow, METH_O,
     "borrow(flag): take tensor addresses and gradient hooks from nnvitals._autograd (True) or torch's Python API."},
    {"reduce", (PyCFunction)(void (*)(void))reduce, METH_FASTCALL,
     "Reduce the tensors an item array describes into a float32 buffer (see probes.py)."},
    {"addresses", (PyCFunction)(void (*)(void))addresses, METH_FASTCALL,
     "Set the items' tensor addresses where the tensors are as the kernel reads them (see probes.py)."},
    {"as_recorded", as_recorded, METH_O,
     "Whether every output kept without a copy is still at the version it had when recorded."},
    {"take_grads", (PyCFunction)(void (*)(void))take_grads, METH_FASTCALL,
     "The gradients handed these outputs, taken from their cells, if each came once and no output changed; else None."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_kernel", NULL, -1, methods, NULL, NULL, NULL, NULL};

/* Bumped whenever item_t, reduce() or the types change: probes.py ignores a build left from another version. */
#define KERNEL_VERSION 15

PyMODINIT_FUNC PyInit__kernel(void) {
    s_nbytes = PyUnicode_InternFromString("nbytes");
    s_is_contiguous = PyUnicode_InternFromString("is_contiguous");
    s_data_ptr = PyUnicode_InternFromString("data_ptr");
    s_dtype = PyUnicode_InternFromString("dtype");
    if (s_nbytes == NULL || s_is_contiguous == NULL || s_data_ptr == NULL || s_dtype == NULL) return NULL;
    const char *names[] = {"_specs", "_matched", "_template", "_producers", "shape", "numel", "protected",
                           "copy", "name", "_entries", "_version", "_outs", "_unprotected", "requires_grad",
                           "_grad_cells", "_grad_outs", "_grad_at", "_grad_versions", "_pending", "_flush",
                           "_replayed_batchnorm", "training", "_bn_batches", "_bias_before_norm", "_parameters",
                           "bias", "is_floating_point", "_output_shape", "_output_name", "_output_params", "trace_all",
                           "_cache", "_root_post", "append", "_backward_hooks", "grad_fn", "nnvitals",
                           "_register_hook_dict", "register_hook"};
    PyObject **slots[] = {&s_specs, &s_matched, &s_template, &s_producers, &s_shape, &s_numel,
                          &s_protected, &s_copy, &s_name, &s_entries, &s_version, &s_outs, &s_unprotected,
                          &s_requires_grad, &s_grad_cells, &s_grad_outs, &s_grad_at, &s_grad_versions, &s_pending,
                          &s_flush, &s_batchnorm, &s_training, &s_bn_batches, &s_bias_before_norm, &s_parameters,
                          &s_bias, &s_is_floating_point, &s_output_shape, &s_output_name, &s_output_params,
                          &s_trace_all, &s_cache, &s_root_post, &s_append, &s_backward_hooks, &s_grad_fn,
                          &s_nnvitals, &s_register_hook_dict, &s_register_hook};
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++)
        if ((*slots[i] = PyUnicode_InternFromString(names[i])) == NULL) return NULL;
    PyObject *lender = PyImport_ImportModule("nnvitals._autograd");
    PyObject *capsule = lender != NULL ? PyObject_GetAttrString(lender, "API") : NULL;
    lent = capsule != NULL ? PyCapsule_GetPointer(capsule, "nnvitals._autograd.API") : NULL;
    Py_XDECREF(capsule); /* (the module, imported for good, keeps it) */
    Py_XDECREF(lender);
    if (lent == NULL || lent->version != NNVITALS_AUTOGRAD_API_VERSION) {
        PyErr_Clear(); /* not built, or from another version of _autograd.h: torch's Python API instead */
        lent = NULL;
    }
    torch_api = lent;
    s_forward = PyUnicode_InternFromString("forward");
    if (s_forward == NULL || PyType_Ready(&replay_type) < 0 || PyType_Ready(&forward_type) < 0 ||
        PyType_Ready(&watch_type) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m != NULL && (PyModule_AddIntConstant(m, "VERSION", KERNEL_VERSION) < 0 ||
                      PyModule_AddObjectRef(m, "Replay", (PyObject *)&replay_type) < 0 ||
                      PyModule_AddObjectRef(m, "Watch", (PyObject *)&watch_type) < 0)) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
