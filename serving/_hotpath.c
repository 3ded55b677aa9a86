/* serving._hotpath: a live session's plain step, recognised, run and answered in C.
 *
 * The streaming hot path of serving/native.py in one compiled call (see
 * serving/wire.py for the wire side and SessionManager.try_plain_step for
 * the decisions; this file makes the same ones). PlainSteps(index, sessions,
 * window, unary)(raw, tenant) returns
 *   bytes   the reply: raw was a plain step met before (a head in
 *           index.known), of a live session, with finite values, on a quiet
 *           model (nothing queued, no arrival within `window` seconds while
 *           batching); the single-slot kernel ran (its compiled C entry,
 *           Cell.one_address) and the bookkeeping of try_plain_step's inline
 *           branch is done: last_arrival, last_used, position, ans_expect,
 *           the batch-size metric;
 *   tuple   (ms, sequence id, model, values): raw is a plain step met before
 *           but something else has to decide (a busy model queues it, a
 *           tenant, a NaN, an unknown session, a kernel refusal...): exactly
 *           what StepIndex.lookup returns, and the caller goes on as it does
 *           with that;
 *   None    not a step met before: the caller parses it.
 * Nothing is changed unless bytes come back. Errors are never raised for a
 * request: anything unexpected is declined (a tuple) so the Python path
 * decides and reports it. Single-threaded: the event loop's thread only.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <time.h>

#if !PY_LITTLE_ENDIAN
#error "the hot path reads and writes protobuf's little-endian floats as they are in memory"
#endif

#define MAX_F 64 /* input features stepped here; wider inputs take the Python path */

/* the layout of numba_cells.packing's meta vector */
#define M_LAYERS 0
#define M_HIDDEN 1
#define M_IN 2
#define M_OUT 3

typedef int64_t (*one_fn)(float *x, int64_t slot, float *h, int64_t nh, float *c, int64_t nc,
                          float *rows, int64_t nrows, float *params, int64_t npar,
                          int64_t *meta, int64_t nmeta, float *work, int64_t nwork);

/* One numpy array's buffer, kept while the owner keeps the same array object. */
typedef struct {
    PyObject *obj;
    Py_buffer view;
} Held;

static void held_clear(Held *h) {
    if (h->obj != NULL) {
        PyBuffer_Release(&h->view);
        Py_CLEAR(h->obj);
    }
}

/* owner.name's buffer (C-contiguous, `ndim` dims, items of `kind`/`size`), from the
 * cache when the attribute is the same object as last time. 0 ok, -1 declined. */
static int held_get(Held *h, PyObject *owner, PyObject *name, int ndim, char kind, Py_ssize_t size) {
    PyObject *obj = PyObject_GetAttr(owner, name);
    if (obj == NULL) {
        PyErr_Clear();
        return -1;
    }
    if (obj == h->obj) {
        Py_DECREF(obj);
        return 0;
    }
    held_clear(h);
    if (PyObject_GetBuffer(obj, &h->view, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT | PyBUF_WRITABLE) < 0) {
        PyErr_Clear();
        Py_DECREF(obj);
        return -1;
    }
    const char *f = h->view.format;
    if (f != NULL && (f[0] == '<' || f[0] == '=' || f[0] == '@')) f++;
    int kind_ok = f != NULL && f[1] == '\0' &&
                  (kind == 'f' ? f[0] == 'f' : kind == 'd' ? f[0] == 'd'
                   : (f[0] == 'q' || f[0] == 'l'));  /* 'i': a 64-bit integer */
    if (!kind_ok || h->view.itemsize != size || h->view.ndim != ndim) {
        PyBuffer_Release(&h->view);
        Py_DECREF(obj);
        return -1;
    }
    h->obj = obj; /* the reference keeps the array, and so the pointer, alive */
    return 0;
}

typedef struct {
    PyObject_HEAD
    PyObject *known;    /* StepIndex.known: head bytes -> (width, fmt, ms, sequence id, model) */
    PyObject *widths;   /* StepIndex.widths: list of int */
    PyObject *sessions; /* the SessionManager */
    PyObject *item;     /* serving.runtime.sessions._Plain: a queued plain step */
    double window;      /* BATCH_WINDOW_S */
    int unary;          /* 1: StepResponse bytes; 0: StreamStepsResponse bytes */
    Held h, c, params, meta, work, rows, used, position, expect;
    vectorcallfunc vectorcall; /* PlainSteps_call: calls skip tuple packing */
} PlainSteps;

static PyObject *s_models, *s_closing, *s_table, *s_pending, *s_batching, *s_next_probe,
    *s_last_arrival, *s_cell, *s_max_queue, *s_n_plain, *s_scheduled, *s_flush, *s_create_future,
    *s_call_soon, *get_running_loop, *s_one_address, *s_one_state, *s_h, *s_c, *s_params, *s_meta,
    *s_one_work, *s_last_y, *s_last_used, *s_position, *s_ans_expect, *s_batch_sizes, *s_observe,
    *one_int;

static int varint(uint8_t *out, uint64_t n) {
    int k = 0;
    while (n > 0x7F) {
        out[k++] = (uint8_t)((n & 0x7F) | 0x80);
        n >>= 7;
    }
    out[k++] = (uint8_t)n;
    return k;
}

static int varint_len(uint64_t n) {
    int k = 1;
    while (n > 0x7F) {
        n >>= 7;
        k++;
    }
    return k;
}

/* StepResponse{y: Tensor{shape: [1, out], float_data: y}, position}, inside a
 * StreamStepsResponse{results: [..]} unless unary: serving.wire.ReplyEncoder's bytes. */
static PyObject *encode_reply(int unary, const float *y, int64_t out, int64_t position) {
    uint8_t head[64];
    int k = 0;
    int shape_len = varint_len(1) + varint_len((uint64_t)out);
    uint64_t data_len = 4 * (uint64_t)out;
    uint64_t tensor_len = 1 + varint_len(shape_len) + shape_len + 1 + varint_len(data_len) + data_len;
    uint64_t step_len = 1 + varint_len(tensor_len) + tensor_len + 1 + varint_len((uint64_t)position);
    if (!unary) {
        head[k++] = 0x0a; /* results: field 1, length-delimited */
        k += varint(head + k, step_len);
    }
    head[k++] = 0x0a; /* y */
    k += varint(head + k, tensor_len);
    head[k++] = 0x0a; /* shape, packed */
    k += varint(head + k, (uint64_t)shape_len);
    k += varint(head + k, 1);
    k += varint(head + k, (uint64_t)out);
    head[k++] = 0x12; /* float_data, packed */
    k += varint(head + k, data_len);
    uint8_t tail[11];
    int t = 0;
    tail[t++] = 0x10; /* position: field 2, varint */
    t += varint(tail + t, (uint64_t)position);
    PyObject *b = PyBytes_FromStringAndSize(NULL, k + (Py_ssize_t)data_len + t);
    if (b == NULL) return NULL;
    char *p = PyBytes_AS_STRING(b);
    memcpy(p, head, k);
    memcpy(p + k, y, data_len); /* little-endian float32: protobuf's own layout */
    memcpy(p + k + data_len, tail, t);
    return b;
}

static double monotonic_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts); /* time.monotonic()'s clock on Linux */
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* Truth of obj.name; -1 when it cannot be read. */
static int attr_true(PyObject *obj, PyObject *name) {
    PyObject *v = PyObject_GetAttr(obj, name);
    if (v == NULL) {
        PyErr_Clear();
        return -1;
    }
    int r = PyObject_IsTrue(v);
    Py_DECREF(v);
    if (r < 0) PyErr_Clear();
    return r;
}

static int attr_double(PyObject *obj, PyObject *name, double *out) {
    PyObject *v = PyObject_GetAttr(obj, name);
    if (v == NULL) {
        PyErr_Clear();
        return -1;
    }
    *out = PyFloat_AsDouble(v);
    Py_DECREF(v);
    if (*out == -1.0 && PyErr_Occurred()) {
        PyErr_Clear();
        return -1;
    }
    return 0;
}

static PyObject *make_values(const float *x, Py_ssize_t F) {
    PyObject *values = PyTuple_New(F);
    if (values == NULL) return NULL;
    for (Py_ssize_t j = 0; j < F; j++) {
        PyObject *f = PyFloat_FromDouble((double)x[j]);
        if (f == NULL) {
            Py_DECREF(values);
            return NULL;
        }
        PyTuple_SET_ITEM(values, j, f);
    }
    return values;
}

/* try_plain_step's busy branch: the step joins the model's queue as a _Plain and
 * *reply is its future (the flush resolves it to (y, position) or the step's error).
 * 1: queued; 0: declined (a full queue: the general path refuses it); -1: a Python error. */
static int queue_step(PlainSteps *self, PyObject *ms, PyObject *pending, Py_ssize_t slot,
                      const float *x, Py_ssize_t F, double now, PyObject **reply) {
    PyObject *v = PyObject_GetAttr(self->sessions, s_max_queue);
    if (v == NULL) {
        PyErr_Clear();
        return 0;
    }
    Py_ssize_t max_queue = PyLong_AsSsize_t(v);
    Py_DECREF(v);
    if (max_queue == -1 && PyErr_Occurred()) {
        PyErr_Clear();
        return 0;
    }
    if (PyList_GET_SIZE(pending) >= max_queue) return 0;
    if (held_get(&self->used, ms, s_last_used, 1, 'd', 8) < 0 || slot >= self->used.view.shape[0])
        return 0;
    PyObject *loop = PyObject_CallNoArgs(get_running_loop);
    if (loop == NULL) {
        PyErr_Clear(); /* no running loop: the Python path decides */
        return 0;
    }
    PyObject *future = PyObject_CallMethodNoArgs(loop, s_create_future);
    PyObject *values = future ? make_values(x, F) : NULL;
    PyObject *slot_obj = values ? PyLong_FromSsize_t(slot) : NULL;
    PyObject *item = slot_obj ? PyObject_CallFunctionObjArgs(self->item, slot_obj, values, future, NULL)
                              : NULL;
    Py_XDECREF(values);
    Py_XDECREF(slot_obj);
    PyObject *t = item ? PyFloat_FromDouble(now) : NULL;
    int ok = t != NULL && PyObject_SetAttr(ms, s_last_arrival, t) == 0;
    Py_XDECREF(t);
    if (ok) {
        ((double *)self->used.view.buf)[slot] = now;
        ok = PyList_Append(pending, item) == 0;
    }
    Py_XDECREF(item);
    if (ok) {
        PyObject *n = PyObject_GetAttr(ms, s_n_plain);
        PyObject *n1 = n ? PyNumber_Add(n, one_int) : NULL;
        ok = n1 != NULL && PyObject_SetAttr(ms, s_n_plain, n1) == 0;
        Py_XDECREF(n);
        Py_XDECREF(n1);
    }
    if (ok) {
        int scheduled = attr_true(ms, s_scheduled);
        ok = scheduled >= 0;
        if (ok && !scheduled) {
            ok = PyObject_SetAttr(ms, s_scheduled, Py_True) == 0;
            PyObject *flush = ok ? PyObject_GetAttr(self->sessions, s_flush) : NULL;
            PyObject *h = flush ? PyObject_CallMethodObjArgs(loop, s_call_soon, flush, ms, NULL) : NULL;
            ok = h != NULL;
            Py_XDECREF(flush);
            Py_XDECREF(h);
        }
    }
    Py_DECREF(loop);
    if (!ok) {
        Py_XDECREF(future);
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_RuntimeError, "queueing a plain step failed: the model's "
                            "sessions have no readable `scheduled` flag");
        return -1;
    }
    *reply = future;
    return 1;
}

/* The step. 1: done, *reply set (bytes: ran inline; a future: queued); 0: declined
 * (nothing changed); -1: a Python error. */
static int run_step(PlainSteps *self, PyObject *ms, PyObject *seq, PyObject *model,
                      const float *x, Py_ssize_t F, PyObject **reply) {
    int r;
    /* the model still loaded is this one, and the server takes work */
    PyObject *models = PyObject_GetAttr(self->sessions, s_models);
    if (models == NULL) goto declined_err;
    PyObject *cur = PyDict_Check(models) ? PyDict_GetItemWithError(models, model) : NULL;
    Py_DECREF(models);
    if (cur != ms) goto declined_err;
    if (attr_true(self->sessions, s_closing) != 0) return 0;

    /* the session is live */
    PyObject *table = PyObject_GetAttr(ms, s_table);
    if (table == NULL) goto declined_err;
    PyObject *slot_obj = PyDict_Check(table) ? PyDict_GetItemWithError(table, seq) : NULL;
    Py_ssize_t slot = slot_obj != NULL && PyLong_CheckExact(slot_obj) ? PyLong_AsSsize_t(slot_obj) : -1;
    Py_DECREF(table);
    if (slot < 0) goto declined_err;

    /* quiet: nothing queued, and no arrival within the window while batching */
    double now = monotonic_now();
    PyObject *pending = PyObject_GetAttr(ms, s_pending);
    if (pending == NULL) goto declined_err;
    if (!PyList_CheckExact(pending)) {
        Py_DECREF(pending);
        return 0;
    }
    int batching = attr_true(ms, s_batching);
    if (batching < 0) {
        Py_DECREF(pending);
        return 0;
    }
    if (!batching) {
        double next_probe;
        if (attr_double(ms, s_next_probe, &next_probe) < 0) {
            Py_DECREF(pending);
            return 0;
        }
        if (now >= next_probe) {
            if (PyObject_SetAttr(ms, s_batching, Py_True) < 0) { /* probe again */
                Py_DECREF(pending);
                return -1;
            }
            batching = 1;
        }
    }
    int quiet = PyList_GET_SIZE(pending) == 0;
    if (quiet && batching) {
        double last;
        if (attr_double(ms, s_last_arrival, &last) < 0) {
            Py_DECREF(pending);
            return 0;
        }
        quiet = now - last > self->window;
    }
    if (!quiet) {
        r = queue_step(self, ms, pending, slot, x, F, now, reply);
        Py_DECREF(pending);
        return r;
    }
    Py_DECREF(pending);

    /* the cell's compiled single-slot step and its arrays */
    PyObject *cell = PyObject_GetAttr(ms, s_cell);
    if (cell == NULL) goto declined_err;
    PyObject *addr_obj = PyObject_GetAttr(cell, s_one_address);
    PyObject *state = addr_obj != NULL ? PyObject_GetAttr(cell, s_one_state) : NULL;
    Py_DECREF(cell);
    if (state == NULL) {
        Py_XDECREF(addr_obj);
        goto declined_err;
    }
    void *addr = PyLong_Check(addr_obj) ? PyLong_AsVoidPtr(addr_obj) : NULL;
    Py_DECREF(addr_obj);
    int got = addr != NULL && !PyErr_Occurred()
        && held_get(&self->h, state, s_h, 3, 'f', 4) == 0
        && held_get(&self->c, state, s_c, 3, 'f', 4) == 0
        && held_get(&self->params, state, s_params, 1, 'f', 4) == 0
        && held_get(&self->meta, state, s_meta, 1, 'i', 8) == 0
        && held_get(&self->work, state, s_one_work, 1, 'f', 4) == 0;
    Py_DECREF(state);
    if (!got) goto declined_err;
    if (held_get(&self->rows, ms, s_last_y, 2, 'f', 4) < 0
        || held_get(&self->used, ms, s_last_used, 1, 'd', 8) < 0
        || held_get(&self->position, ms, s_position, 1, 'i', 8) < 0
        || held_get(&self->expect, ms, s_ans_expect, 1, 'i', 8) < 0) return 0;

    const int64_t *meta = (const int64_t *)self->meta.view.buf;
    Py_ssize_t nmeta = self->meta.view.shape[0];
    if (nmeta <= M_OUT) return 0;
    int64_t L = meta[M_LAYERS], H = meta[M_HIDDEN], out = meta[M_OUT];
    Py_ssize_t *hs = self->h.view.shape, *cs = self->c.view.shape, *rs = self->rows.view.shape;
    if (meta[M_IN] != F || hs[1] != L || hs[2] != H || rs[1] != out
        || !((cs[0] == hs[0] && cs[1] == L && cs[2] == H) || (cs[0] == 1 && cs[1] == 1 && cs[2] == 1))
        || slot >= self->used.view.shape[0] || slot >= self->position.view.shape[0]
        || slot >= self->expect.view.shape[0]) return 0;
    if (self->work.view.shape[0] < 4 * H + (F > H ? F : H) + 3 * H) return 0;

    float xin[MAX_F];
    memcpy(xin, x, F * sizeof(float));
    int64_t code = ((one_fn)addr)(xin, slot, (float *)self->h.view.buf, hs[0], (float *)self->c.view.buf, cs[0],
                                  (float *)self->rows.view.buf, rs[0], (float *)self->params.view.buf,
                                  self->params.view.shape[0], (int64_t *)meta, nmeta,
                                  (float *)self->work.view.buf, self->work.view.shape[0]);
    if (code != 0) return 0; /* a refused slot: nothing ran; the Python path reports it */

    /* try_plain_step's inline bookkeeping, then _count_one's */
    PyObject *t = PyFloat_FromDouble(now);
    if (t == NULL) return -1;
    r = PyObject_SetAttr(ms, s_last_arrival, t);
    Py_DECREF(t);
    if (r < 0) return -1;
    ((double *)self->used.view.buf)[slot] = now;
    int64_t pos = ++((int64_t *)self->position.view.buf)[slot];
    ((int64_t *)self->expect.view.buf)[slot] = -1;
    PyObject *sizes = PyObject_GetAttr(ms, s_batch_sizes);
    if (sizes == NULL) return -1;
    if (sizes != Py_None) {
        PyObject *res = PyObject_CallMethodOneArg(sizes, s_observe, one_int);
        if (res == NULL) {
            Py_DECREF(sizes);
            return -1;
        }
        Py_DECREF(res);
    }
    Py_DECREF(sizes);
    *reply = encode_reply(self->unary, (const float *)self->rows.view.buf + slot * out, out, pos);
    return *reply == NULL ? -1 : 1;

declined_err:
    PyErr_Clear();
    return 0;
}

static PyObject *PlainSteps_call(PlainSteps *self, PyObject *const *args, size_t nargsf,
                                 PyObject *kwnames) {
    Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
    if (nargs != 2 || kwnames != NULL) {
        PyErr_SetString(PyExc_TypeError, "PlainSteps(raw, tenant) takes two positional arguments");
        return NULL;
    }
    PyObject *raw = args[0], *tenant = args[1];
    if (!PyBytes_CheckExact(raw) || !PyList_Check(self->widths) || !PyDict_Check(self->known))
        Py_RETURN_NONE;
    const char *data = PyBytes_AS_STRING(raw);
    Py_ssize_t n = PyBytes_GET_SIZE(raw);
    PyObject *hit = NULL;
    Py_ssize_t width = 0;
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(self->widths) && hit == NULL; i++) {
        width = PyLong_AsSsize_t(PyList_GET_ITEM(self->widths, i));
        if (width <= 0 || width > n || width % 4) {
            PyErr_Clear();
            continue;
        }
        PyObject *key = PyBytes_FromStringAndSize(data, n - width);
        if (key == NULL) return NULL;
        PyObject *entry = PyDict_GetItemWithError(self->known, key);
        Py_DECREF(key);
        if (entry == NULL) {
            if (PyErr_Occurred()) return NULL;
            continue;
        }
        if (PyTuple_CheckExact(entry) && PyTuple_GET_SIZE(entry) == 5
            && PyLong_AsSsize_t(PyTuple_GET_ITEM(entry, 0)) == width)
            hit = entry;
        PyErr_Clear();
    }
    if (hit == NULL) Py_RETURN_NONE;
    Py_INCREF(hit); /* a step may run Python code (the metric) that changes the index */
    PyObject *ms = PyTuple_GET_ITEM(hit, 2), *seq = PyTuple_GET_ITEM(hit, 3),
             *model = PyTuple_GET_ITEM(hit, 4);
    Py_ssize_t F = width / 4;
    const char *tail = data + n - width;
    PyObject *values;
    if (F <= MAX_F) {
        float x[MAX_F];
        int finite = 1;
        memcpy(x, tail, width);
        for (Py_ssize_t j = 0; j < F; j++) finite &= isfinite(x[j]) != 0;
        if (finite && PyUnicode_Check(tenant) && PyUnicode_GET_LENGTH(tenant) == 0) {
            PyObject *reply = NULL;
            int r = run_step(self, ms, seq, model, x, F, &reply);
            if (r != 0) {
                Py_DECREF(hit);
                return r > 0 ? reply : NULL;
            }
        }
        values = make_values(x, F);
    } else {
        values = PyTuple_New(F);
        for (Py_ssize_t j = 0; values != NULL && j < F; j++) {
            float v;
            memcpy(&v, tail + 4 * j, 4);
            PyObject *f = PyFloat_FromDouble((double)v);
            if (f == NULL) Py_CLEAR(values);
            else PyTuple_SET_ITEM(values, j, f);
        }
    }
    /* declined: what StepIndex.lookup returns, (ms, sequence id, model, values) */
    PyObject *out = values != NULL ? PyTuple_Pack(4, ms, seq, model, values) : NULL;
    Py_XDECREF(values);
    Py_DECREF(hit);
    return out;
}

static PyObject *PlainSteps_new(PyTypeObject *type, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"index", "sessions", "window", "queue_item", "unary", NULL};
    PyObject *index, *sessions, *item;
    double window;
    int unary = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOdO|p", kwlist, &index, &sessions, &window, &item,
                                     &unary))
        return NULL;
    PyObject *known = PyObject_GetAttrString(index, "known");
    PyObject *widths = known ? PyObject_GetAttrString(index, "widths") : NULL;
    if (widths == NULL || !PyDict_Check(known) || !PyList_Check(widths)) {
        Py_XDECREF(known);
        Py_XDECREF(widths);
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_TypeError, "index needs a dict `known` and a list `widths`");
        return NULL;
    }
    PlainSteps *self = (PlainSteps *)type->tp_alloc(type, 0);
    if (self == NULL) {
        Py_DECREF(known);
        Py_DECREF(widths);
        return NULL;
    }
    self->known = known;
    self->widths = widths;
    Py_INCREF(sessions);
    self->sessions = sessions;
    Py_INCREF(item);
    self->item = item;
    self->window = window;
    self->unary = unary;
    self->vectorcall = (vectorcallfunc)PlainSteps_call;
    return (PyObject *)self;
}

static int PlainSteps_traverse(PlainSteps *self, visitproc visit, void *arg) {
    Py_VISIT(self->known);
    Py_VISIT(self->widths);
    Py_VISIT(self->sessions);
    Py_VISIT(self->item);
    return 0;
}

static void PlainSteps_release_held(PlainSteps *self) {
    held_clear(&self->h);
    held_clear(&self->c);
    held_clear(&self->params);
    held_clear(&self->meta);
    held_clear(&self->work);
    held_clear(&self->rows);
    held_clear(&self->used);
    held_clear(&self->position);
    held_clear(&self->expect);
}

static int PlainSteps_clear(PlainSteps *self) {
    PlainSteps_release_held(self);
    Py_CLEAR(self->known);
    Py_CLEAR(self->widths);
    Py_CLEAR(self->sessions);
    Py_CLEAR(self->item);
    return 0;
}

static void PlainSteps_dealloc(PlainSteps *self) {
    PyObject_GC_UnTrack(self);
    PlainSteps_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *PlainSteps_tp_call(PyObject *self, PyObject *args, PyObject *kwargs) {
    return PyVectorcall_Call(self, args, kwargs);
}

static PyTypeObject PlainStepsType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "serving._hotpath.PlainSteps",
    .tp_doc = "PlainSteps(index, sessions, window, unary=False)(raw, tenant) -> bytes | tuple | None "
              "(see the module doc)",
    .tp_basicsize = sizeof(PlainSteps),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL,
    .tp_vectorcall_offset = offsetof(PlainSteps, vectorcall),
    .tp_new = PlainSteps_new,
    .tp_call = PlainSteps_tp_call,
    .tp_traverse = (traverseproc)PlainSteps_traverse,
    .tp_clear = (inquiry)PlainSteps_clear,
    .tp_dealloc = (destructor)PlainSteps_dealloc,
};

static PyObject *encode_reply_py(PyObject *mod, PyObject *args) {
    (void)mod;
    Py_buffer y;
    long long position;
    int unary;
    if (!PyArg_ParseTuple(args, "y*Lp", &y, &position, &unary)) return NULL;
    PyObject *b = NULL;
    if (y.len % 4 || position < 0)
        PyErr_SetString(PyExc_ValueError, "y: float32 bytes; position >= 0");
    else
        b = encode_reply(unary, (const float *)y.buf, y.len / 4, position);
    PyBuffer_Release(&y);
    return b;
}

static PyMethodDef module_methods[] = {
    {"encode_reply", encode_reply_py, METH_VARARGS,
     "encode_reply(y_float32_bytes, position, unary) -> the reply bytes PlainSteps writes"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "serving._hotpath",
    "A live session's plain step in one compiled call (see the C source's header).", -1,
    module_methods, NULL, NULL, NULL, NULL,
};

#define INTERN(var, text) if ((var = PyUnicode_InternFromString(text)) == NULL) return NULL

PyMODINIT_FUNC PyInit__hotpath(void) {
    INTERN(s_models, "models");
    INTERN(s_closing, "closing");
    INTERN(s_table, "table");
    INTERN(s_pending, "pending");
    INTERN(s_batching, "batching");
    INTERN(s_next_probe, "next_probe");
    INTERN(s_last_arrival, "last_arrival");
    INTERN(s_cell, "cell");
    INTERN(s_max_queue, "max_queue");
    INTERN(s_n_plain, "n_plain");
    INTERN(s_scheduled, "scheduled");
    INTERN(s_flush, "_flush");
    INTERN(s_create_future, "create_future");
    INTERN(s_call_soon, "call_soon");
    INTERN(s_one_address, "one_address");
    INTERN(s_one_state, "one_state");
    INTERN(s_h, "h");
    INTERN(s_c, "c");
    INTERN(s_params, "params");
    INTERN(s_meta, "meta");
    INTERN(s_one_work, "one_work");
    INTERN(s_last_y, "last_y");
    INTERN(s_last_used, "last_used");
    INTERN(s_position, "position");
    INTERN(s_ans_expect, "ans_expect");
    INTERN(s_batch_sizes, "batch_sizes");
    INTERN(s_observe, "observe");
    if ((one_int = PyLong_FromLong(1)) == NULL) return NULL;
    PyObject *asyncio = PyImport_ImportModule("asyncio");
    if (asyncio == NULL) return NULL;
    get_running_loop = PyObject_GetAttrString(asyncio, "get_running_loop");
    Py_DECREF(asyncio);
    if (get_running_loop == NULL) return NULL;
    if (PyType_Ready(&PlainStepsType) < 0) return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL) return NULL;
    Py_INCREF(&PlainStepsType);
    if (PyModule_AddObject(m, "PlainSteps", (PyObject *)&PlainStepsType) < 0) {
        Py_DECREF(&PlainStepsType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
