/* What nnvitals._autograd (C++, built against torch's headers) lends the C kernel through the capsule
 * "nnvitals._autograd.API": the few things that cost microseconds through torch's Python bindings and nanoseconds
 * through its C++ API. */
#ifndef NNVITALS_AUTOGRAD_H
#define NNVITALS_AUTOGRAD_H
#include <Python.h>
#include <stdint.h>

#define NNVITALS_AUTOGRAD_API_VERSION 2

typedef struct {
    int version; /* NNVITALS_AUTOGRAD_API_VERSION */
    /* A tensor's address where it holds exactly `numel` float32 values, contiguous, in host memory; 0 for None;
     * -1 where it is not such a tensor (the caller converts it, or tells); never an exception. */
    int64_t (*address)(PyObject *t, int64_t numel);
    /* Have autograd append the gradient arriving at tensor `out` to the list `cell`, as a hook on out's grad_fn
     * (what Tensor.register_hook does for a non-leaf, without the handle and without the Python hooks dict):
     * 1 done; 0 where out is not a plain tensor with a grad_fn (the caller registers a Python hook); -1 with an
     * exception set. */
    int (*keep_grad)(PyObject *out, PyObject *cell);
    /* What a replayed record reads of its output, as Tensor.shape == shape, Tensor._version and
     * Tensor.requires_grad do: 1 or 0 (tensor_version: the version itself); -1 where t is not a plain tensor (or
     * shape not a tuple of ints), which the caller then asks through Python; never an exception. */
    int (*same_shape)(PyObject *t, PyObject *shape);
    int64_t (*tensor_version)(PyObject *t);
    int (*requires_grad)(PyObject *t);
} nnvitals_autograd_api;

#endif
