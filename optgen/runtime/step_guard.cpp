// The checks of a bound launch (Note [Cached steps] in step_cache.py; Note [Native step guard] in
// step_guard.py) as one C++ pass over a param group: what the Python guard does with ~14 maps of
// tensor methods at ~50 ns a call each, read here from the tensors' C++ objects in a few ns.
//
// Two functions, both given the GIL:
//   snapshot(tensors) -> bytes | None
//       one Record per tensor (below), None when a tensor is not one a launch may address;
//   revalidate(current, bound, with_grad, state, keys, objects, expected, grad_table) -> bool
//       whether the group's lists are still those the launch was bound for; when they are, the
//       gradients' addresses are written into grad_table (an int64 buffer, one per gradient).
// Anything unexpected (a C++ exception, a Python error from a state lookup) answers False: the
// caller then takes the checked path, which raises torch's own error where there is one.
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <torch/csrc/autograd/python_variable.h>

#include <cstdint>
#include <cstring>

namespace {

// What a launch depends on of a tensor it addresses: where its elements are, how many, of which
// type, in which shape (a hash of its sizes: the checked path raises torch's size error for a
// tensor reshaped in place, and a kernel reading rows and columns needs them); `usable` is 1 when
// the kernel may address it at all.
struct Record {
  int64_t address;
  int64_t numel;
  int64_t dtype;
  int64_t shape;
  int64_t usable;
};

// FNV-1a over the rank and sizes (a mismatch the hash missed would still address the same
// memory: the element count, contiguity and address are compared exactly)
int64_t shape_of(const at::Tensor& t) {
  uint64_t h = 1469598103934665603ull ^ static_cast<uint64_t>(t.dim());
  for (const int64_t size : t.sizes()) {
    h = (h ^ static_cast<uint64_t>(size)) * 1099511628211ull;
  }
  return static_cast<int64_t>(h);
}

// Whether ``t`` is memory a kernel may read as ``numel`` contiguous elements: strided, contiguous,
// on the CPU, inside its storage, no lazily negated or conjugated view, no Python dispatch
// (a __torch_dispatch__ subclass's memory need not be its values).
bool addressable(const at::Tensor& t) {
  if (!t.defined() || t.layout() != at::kStrided || !t.device().is_cpu() || !t.has_storage() ||
      !t.is_contiguous() || t.is_neg() || t.is_conj() || t.key_set().has(c10::DispatchKey::Python)) {
    return false;
  }
  const int64_t end = (t.storage_offset() + t.numel()) * static_cast<int64_t>(t.element_size());
  return end <= static_cast<int64_t>(t.storage().nbytes());
}

// ``obj``'s Record (of a written tensor: its mutable address, which a copy-on-write storage
// materializes, so a shared one is never written through).
Record describe(PyObject* obj) {
  Record r{0, 0, 0, 0, 0};
  if (!THPVariable_CheckExact(obj)) {
    return r;
  }
  const at::Tensor& t = THPVariable_Unpack(obj);
  if (!addressable(t)) {
    return r;
  }
  r.address = reinterpret_cast<int64_t>(t.mutable_data_ptr());
  r.numel = t.numel();
  r.dtype = static_cast<int64_t>(t.scalar_type());
  r.shape = shape_of(t);
  r.usable = 1;
  return r;
}

bool same(const Record& a, const Record& b) {
  return a.usable && a.address == b.address && a.numel == b.numel && a.dtype == b.dtype && a.shape == b.shape;
}

PyObject* snapshot(PyObject*, PyObject* tensors) {
  if (!PyList_Check(tensors)) {
    PyErr_SetString(PyExc_TypeError, "snapshot: a list of tensors");
    return nullptr;
  }
  const Py_ssize_t n = PyList_GET_SIZE(tensors);
  PyObject* out = PyBytes_FromStringAndSize(nullptr, n * static_cast<Py_ssize_t>(sizeof(Record)));
  if (out == nullptr) {
    return nullptr;
  }
  auto* records = reinterpret_cast<Record*>(PyBytes_AS_STRING(out));
  try {
    for (Py_ssize_t i = 0; i < n; ++i) {
      records[i] = describe(PyList_GET_ITEM(tensors, i));
      if (!records[i].usable) {
        Py_DECREF(out);
        Py_RETURN_NONE;
      }
    }
  } catch (...) {
    Py_DECREF(out);
    Py_RETURN_NONE;
  }
  return out;
}

// The checks themselves; false at the first that fails.
//   current, bound: the group's parameter list now and when bound (the same objects, in order);
//   with_grad: per bound parameter, 1 where it had a gradient (the launch's parameters);
//   state, keys: the optimizer's state and the keys of the states the launch addresses;
//   objects: per launch parameter j and key k, objects[j * K + k], the state bound;
//   expected: the Records of the launch's parameters, then of objects (snapshot of each);
//   grad: the table to write the gradients' addresses into.
//   (launched: the launch's parameters, the sizes of grad and objects checked against it by the caller)
// In four passes with short bodies rather than one with a long one: after a forward and backward
// most of what is read here is out of the cache, and a short body lets the processor have several
// tensors' misses in flight at once (the dict lookups call Python, and would serialize them).
bool check(PyObject* current, PyObject* bound, const char* with_grad, PyObject* state, PyObject* keys,
           PyObject* objects, const Record* expected, int64_t* grad, Py_ssize_t launched) {
  const Py_ssize_t n = PyList_GET_SIZE(bound);
  // their states are the objects bound (a dict lookup per parameter: the tensor's __hash__ is Python's);
  // first, before any gradient is read: Python code (a key's __eq__) may replace one, freeing it
  const Py_ssize_t K = PyTuple_GET_SIZE(keys);
  Py_ssize_t m = 0;
  for (Py_ssize_t i = 0; i < n && K; ++i) {
    if (!with_grad[i]) {
      continue;
    }
    if (m == launched) {  // (more with a gradient than bound: pass 1 says so)
      return false;
    }
    PyObject* held = PyDict_GetItemWithError(state, PyList_GET_ITEM(bound, i));
    if (held == nullptr || !PyDict_CheckExact(held)) {  // (a subclass may override its lookup)
      return false;
    }
    // held while its keys are looked up: a key's __eq__ (Python) may remove it from the state, its
    // only other reference, and a lookup in a freed dict reads freed memory
    Py_INCREF(held);
    bool found = true;
    for (Py_ssize_t k = 0; k < K && found; ++k) {
      found = PyDict_GetItemWithError(held, PyTuple_GET_ITEM(keys, k)) == PyList_GET_ITEM(objects, m * K + k);
    }
    Py_DECREF(held);
    if (!found) {
      return false;
    }
    ++m;
  }
  // the same parameters (the group's list read after the lookups: they may change it), those with a
  // gradient where they were, as they were
  if (PyList_GET_SIZE(current) != n) {
    return false;
  }
  m = 0;
  for (Py_ssize_t i = 0; i < n; ++i) {
    PyObject* p = PyList_GET_ITEM(current, i);
    if (p != PyList_GET_ITEM(bound, i)) {
      return false;
    }
    if (with_grad[i]) {
      if (m == launched || !same(describe(p), expected[m])) {  // (m == launched: more than bound)
        return false;
      }
      ++m;
    }
  }
  if (m != launched) {
    return false;
  }
  // their gradients readable as that many elements of their dtype (and none where none was)
  m = 0;
  for (Py_ssize_t i = 0; i < n; ++i) {
    const at::Tensor& g = THPVariable_Unpack(PyList_GET_ITEM(bound, i)).grad();  // (a plain tensor)
    if (!with_grad[i]) {
      if (g.defined()) {
        return false;
      }
      continue;
    }
    if (!addressable(g) || g.numel() != expected[m].numel || static_cast<int64_t>(g.scalar_type()) != expected[m].dtype) {
      return false;
    }
    grad[m++] = reinterpret_cast<int64_t>(g.const_data_ptr());
  }
  // where they were, as they were
  const Record* state_records = expected + launched;
  for (Py_ssize_t s = 0, S = PyList_GET_SIZE(objects); s < S; ++s) {
    if (!same(describe(PyList_GET_ITEM(objects, s)), state_records[s])) {
      return false;
    }
  }
  return true;
}

PyObject* revalidate(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  if (nargs != 8 || !PyList_Check(args[0]) || !PyList_Check(args[1]) || !PyBytes_Check(args[2]) ||
      !PyDict_Check(args[3]) || !PyTuple_Check(args[4]) || !PyList_Check(args[5]) || !PyBytes_Check(args[6])) {
    PyErr_SetString(PyExc_TypeError,
                    "revalidate(current: list, bound: list, with_grad: bytes, state: dict, keys: tuple, "
                    "objects: list, expected: bytes, grad_table: writable int64 buffer)");
    return nullptr;
  }
  const Py_ssize_t n = PyList_GET_SIZE(args[1]);
  const Py_ssize_t K = PyTuple_GET_SIZE(args[4]);
  Py_buffer table;
  if (PyObject_GetBuffer(args[7], &table, PyBUF_WRITABLE | PyBUF_FORMAT) < 0) {
    return nullptr;
  }
  // the sizes the loop relies on, checked once: a mismatch is a caller's bug, not a changed group
  const Py_ssize_t launched = table.len / 8;
  const bool sizes = PyBytes_GET_SIZE(args[2]) == n && table.itemsize == 8 && table.format != nullptr &&
                     (std::strcmp(table.format, "q") == 0 || std::strcmp(table.format, "l") == 0) &&
                     PyList_GET_SIZE(args[5]) == launched * K &&
                     PyBytes_GET_SIZE(args[6]) == static_cast<Py_ssize_t>(sizeof(Record)) * launched * (1 + K);
  if (!sizes) {
    PyBuffer_Release(&table);
    PyErr_SetString(PyExc_ValueError, "revalidate: inconsistent sizes");
    return nullptr;
  }
  bool ok = false;
  try {
    ok = check(args[0], args[1], PyBytes_AS_STRING(args[2]), args[3], args[4], args[5],
               reinterpret_cast<const Record*>(PyBytes_AS_STRING(args[6])), static_cast<int64_t*>(table.buf),
               launched);
  } catch (...) {
    ok = false;
  }
  PyBuffer_Release(&table);
  if (PyErr_Occurred()) {  // a state lookup raised (a key's __eq__): the checked path will see it again
    PyErr_Clear();
    ok = false;
  }
  if (ok) {
    Py_RETURN_TRUE;
  }
  Py_RETURN_FALSE;
}

PyMethodDef methods[] = {
    {"snapshot", snapshot, METH_O, "Records of tensors a launch addresses (None: one it may not)."},
    {"revalidate", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(revalidate)), METH_FASTCALL,
     "Whether a bound launch's lists are unchanged; writes the gradients' addresses."},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef module = {PyModuleDef_HEAD_INIT, "optgen_step_guard", nullptr, -1, methods};

}  // namespace

PyMODINIT_FUNC PyInit_optgen_step_guard() { return PyModule_Create(&module); }
