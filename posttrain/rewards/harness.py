"""code_exec's test harness: the completion and its tests run in two processes, and only the tests' process
decides the verdict.

Why not run them in one interpreter, as HumanEval-style harnesses do: there the completion's code runs before
the tests, in the same process, so it can decide their outcome. Every trick below scored 1.0 on failing code:
``builtins.exec = lambda *a: None`` (the harness ran the tests through that ``exec``), walking frames to the
result's nonce and writing a forged result, ``sys.exit(0)`` before the tests, an object whose ``__eq__`` is
always True, patching ``math.isclose`` or ``unittest``'s asserts, reading the tests from the harness's memory.

Here (departing from HumanEval's ``check(candidate)`` harness, which we keep as a test format):

* The **server** (the worker, pid 2 in the namespaces) runs the completion's top-level code in a fresh module and
  then answers requests: call this, get that attribute, iterate, compare two of your objects. It never sees the
  tests: the supervisor forks it before reading them from stdin.
* The **tester** runs the tests with the completion's names bound to proxies (``Remote``); it is forked by the
  supervisor, is not dumpable, and holds the only pipe to the supervisor that carries a verdict, so nothing the
  server does reaches its memory or its verdict. Values cross as data (JSON with tags for tuple, set, dict,
  bytes, complex, Fraction, Decimal): the tester compares values it built itself, so an always-equal object
  arrives as a handle, and a handle never equals plain data. Names the tests use that are modules are the
  tester's own imports, and names of builtins are never replaced by the completion's.

What the completion can still do: return the right values (that is the task), make a handle truthy, and define
``__eq__`` for comparisons between two of its own objects (a test of a class it writes). Arguments mutated by a
call are copied back (a list sorted in place). Not supported: passing functions to the completion (a lambda
argument), catching the completion's own exception classes, globals the completion changes after its top-level
code ran (the tester sees the value at that point).
"""

CHILD_CODE = r'''
_MAX_MSG = 64 << 20  # a message over this is not an answer
_MUTABLE = (list, dict, set, bytearray)

def send_msg(fd, obj):
    data = json.dumps(obj).encode()
    data = b"%010d" % len(data) + data
    while data:
        data = data[os.write(fd, data):]

def recv_msg(fd):
    head = read_exact(fd, 10)
    if len(head) < 10 or not head.isdigit() or int(head) > _MAX_MSG:
        raise EOFError("the other side hung up or sent no message")
    body = read_exact(fd, int(head))
    if len(body) < int(head):
        raise EOFError("message cut short")
    return json.loads(body)

def names_used(code):
    """Every global name the tests' code (and the functions it defines) may look up."""
    names, todo = set(), [code]
    while todo:
        c = todo.pop()
        names.update(c.co_names)
        todo += [k for k in c.co_consts if hasattr(k, "co_names")]
    return names

# ---- the server: the completion's process (untrusted from the first line of the completion on) ----

def server(job, sources, status_fd, req_fd, resp_fd, scratch):
    os.setpgid(0, 0)
    if not confine(job, status_fd, scratch):
        os._exit(0)
    if hasattr(sys, "set_int_max_str_digits"):
        sys.set_int_max_str_digits(0)
    import types
    mod = types.ModuleType("__sandbox__")  # "if __name__ == '__main__'" blocks are skipped
    sys.modules[mod.__name__] = mod
    handles, me = {}, os.getpid()
    try:
        first = recv_msg(req_fd)  # the tester is up: only now may the completion fork or fill the process table
    except (EOFError, ValueError):
        os._exit(0)
    try:
        exec(compile(sources[0][0], "<completion>", "exec"), mod.__dict__)
        reply = {"names": {n: encode(mod.__dict__[n], handles) for n in first["names"] if n in mod.__dict__}}
    except BaseException as e:
        if os.getpid() != me:
            os._exit(1)  # a forked copy of the completion: only the original process answers
        kind = "assert" if isinstance(e, AssertionError) else kind_of(e)
        reply = {"error": kind, "detail": ("%s: %s" % (type(e).__name__, e))[:500]}
        os.write(status_fd, json.dumps(reply).encode())  # the error's kind, for the parent's counts
    if os.getpid() != me:
        os._exit(0)
    send_msg(resp_fd, reply)
    while True:
        try:
            msg = recv_msg(req_fd)
        except (EOFError, ValueError):
            os._exit(0)
        reply = serve(msg, handles)
        if os.getpid() != me:
            os._exit(0)
        send_msg(resp_fd, reply)

def serve(msg, handles):
    try:
        obj = handles[msg["h"]]
        op = msg["op"]
        if op == "call":
            args = [decode(a, handles) for a in msg["args"]]
            value = obj(*args, **{k: decode(v, handles) for k, v in msg["kw"].items()})
            back = [encode(a, handles) if type(a) in _MUTABLE else None for a in args]
            return {"v": encode(value, handles), "back": back}
        if op == "getattr":
            value = getattr(obj, msg["name"])
        elif op == "setattr":
            value = setattr(obj, msg["name"], decode(msg["value"], handles))
        elif op == "eq":
            value = bool(obj == handles[msg["other"]])
        elif op in ("getitem", "contains", "isinstance"):
            arg = decode(msg["arg"], handles)
            value = obj[arg] if op == "getitem" else (arg in obj) if op == "contains" else isinstance(arg, obj)
        else:
            value = {"iter": iter, "next": next, "bool": bool, "len": len, "str": str, "repr": repr}[op](obj)
        return {"v": encode(value, handles)}
    except BaseException as e:
        try:
            return {"raise": type(e).__name__, "errno": getattr(e, "errno", None), "msg": str(e)[:500]}
        except BaseException:
            return {"raise": "Exception", "errno": None, "msg": ""}

def encode(v, handles, depth=0):
    """A value as JSON data; anything but plain data becomes a handle. Subclasses and numpy values go as the
    plain value they hold: the tester compares that value, never the object's own methods."""
    if depth > 200:
        raise ValueError("value nested too deep")
    t = type(v)
    if v is None or t in (bool, int, float, str):
        return v
    if t is list:
        return [encode(x, handles, depth + 1) for x in v]
    if t in (tuple, set, frozenset):
        return {"tsf"[(tuple, set, frozenset).index(t)]: [encode(x, handles, depth + 1) for x in v]}
    if t is dict:
        return {"d": [[encode(k, handles, depth + 1), encode(x, handles, depth + 1)] for k, x in v.items()]}
    if t in (bytes, bytearray):
        return {"b" if t is bytes else "ba": v.hex()}
    if t is complex:
        return {"c": [v.real, v.imag]}
    if t.__module__ in ("fractions", "decimal") and t.__name__ in ("Fraction", "Decimal"):
        return {t.__name__: str(v)}
    if t.__name__ == "module":
        return {"m": v.__name__}
    for base in (int, float, str, bytes):
        if isinstance(v, base):
            return encode(str.__str__(v) if base is str else base(v), handles, depth + 1)
    if t.__module__ == "numpy" and hasattr(v, "tolist"):
        return encode(v.tolist(), handles, depth)
    handles[id(v)] = v
    return {"h": id(v)}

def decode(v, handles):
    if type(v) is list:
        return [decode(x, handles) for x in v]
    if type(v) is not dict:
        return v
    (tag, x), = v.items()
    if tag == "h":
        return handles[x]
    if tag == "d":
        return {decode(k, handles): decode(y, handles) for k, y in x}
    return decode_tag(tag, [decode(y, handles) for y in x] if tag in "tsf" else x)

def decode_tag(tag, x):
    if tag in "tsf":
        return {"t": tuple, "s": set, "f": frozenset}[tag](x)
    if tag in ("b", "ba"):
        return (bytes if tag == "b" else bytearray).fromhex(x)
    if tag == "c":
        return complex(*x)
    if tag in ("Fraction", "Decimal"):
        import decimal, fractions
        return getattr(fractions if tag == "Fraction" else decimal, tag)(x)
    raise ValueError("unknown tag %r" % tag)

# ---- the tester: the tests' process (trusted; reads only data from the server) ----

class PeerFailed(BaseException):
    """The completion's process died, hung up or broke the protocol (a BaseException: tests cannot catch it)."""

class RemoteError(Exception):
    """An exception of a class the tester does not have (the completion's own), raised in the completion."""

class Link:
    def __init__(self, req_fd, resp_fd):
        self.req, self.resp, self.failed, self.proxies = req_fd, resp_fd, False, {}

    def ask(self, msg):
        if self.failed:
            raise PeerFailed("the completion's process is gone")
        try:
            send_msg(self.req, msg)
            reply = recv_msg(self.resp)
            if not isinstance(reply, dict):
                raise ValueError("not a message")
        except (OSError, EOFError, ValueError, RecursionError, MemoryError) as e:
            self.failed = True
            raise PeerFailed(str(e)) from None
        if "raise" in reply:
            raise remote_exception(reply)
        return reply

    def value(self, reply, key="v"):
        try:
            return self.decode(reply[key])
        except (KeyError, TypeError, ValueError, ArithmeticError, RecursionError) as e:
            self.failed = True
            raise PeerFailed("bad data from the completion: %s" % e) from None

    def decode(self, v):
        if type(v) is list:
            return [self.decode(x) for x in v]
        if type(v) is not dict:
            return v
        (tag, x), = v.items()
        if tag == "h":
            if type(x) is not int:
                raise ValueError("bad handle")
            return self.proxies.setdefault(x, Remote(self, x))
        if tag == "d":
            return {self.decode(k): self.decode(y) for k, y in x}
        return decode_tag(tag, [self.decode(y) for y in x] if tag in "tsf" else x)

    def encode(self, v, depth=0):
        if depth > 200:
            raise ValueError("argument nested too deep")
        t = type(v)
        if v is None or t in (bool, int, float, str):
            return v
        if t is Remote:
            return {"h": object.__getattribute__(v, "_h")}
        if t is list:
            return [self.encode(x, depth + 1) for x in v]
        if t is dict:
            return {"d": [[self.encode(k, depth + 1), self.encode(x, depth + 1)] for k, x in v.items()]}
        if t in (tuple, set, frozenset):
            return {"tsf"[(tuple, set, frozenset).index(t)]: [self.encode(x, depth + 1) for x in v]}
        if t in (bytes, bytearray):
            return {"b" if t is bytes else "ba": v.hex()}
        if t is complex:
            return {"c": [v.real, v.imag]}
        if t.__name__ in ("Fraction", "Decimal") and t.__module__ in ("fractions", "decimal"):
            return {t.__name__: str(v)}
        raise TypeError("cannot pass a %s to the completion's code" % t.__name__)

def remote_exception(reply):
    import builtins
    cls = getattr(builtins, str(reply.get("raise")), None)
    if not (isinstance(cls, type) and issubclass(cls, Exception)):
        return RemoteError("%s: %s" % (reply.get("raise"), reply.get("msg")))
    if issubclass(cls, OSError) and isinstance(reply.get("errno"), int):
        return cls(reply["errno"], str(reply.get("msg")))
    try:
        return cls(str(reply.get("msg")))
    except Exception:
        return RemoteError(str(reply.get("msg")))

def _ask(self, op, **kw):
    link = object.__getattribute__(self, "_link")
    return link.value(link.ask(dict(kw, op=op, h=object.__getattribute__(self, "_h"))))

def _typed(value, types_, op):
    if type(value) not in types_:
        raise TypeError("the completion's %s returned a %s" % (op, type(value).__name__))
    return value

class Remote:
    """An object of the completion's, in the tester: every use is a request to the server; equal only to
    another of its objects (asked there), never to plain data."""
    __slots__ = ("_link", "_h")

    def __init__(self, link, h):
        object.__setattr__(self, "_link", link)
        object.__setattr__(self, "_h", h)

    def __call__(self, *args, **kw):
        link = object.__getattribute__(self, "_link")
        sent = [link.encode(a) for a in args]
        reply = link.ask({"op": "call", "h": object.__getattribute__(self, "_h"), "args": sent,
                          "kw": {k: link.encode(v) for k, v in kw.items()}})
        back = reply.get("back")
        for a, new in zip(args, back if isinstance(back, list) else []):
            if type(a) in _MUTABLE and new is not None:  # a list sorted in place, a dict filled
                new = link.value({"v": new})
                if type(new) is type(a):
                    if type(a) is list or type(a) is bytearray:
                        a[:] = new
                    else:
                        a.clear()
                        a.update(new)
        return link.value(reply)

    def __getattr__(self, name):
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        return _ask(self, "getattr", name=name)

    def __setattr__(self, name, value):
        _ask(self, "setattr", name=name, value=object.__getattribute__(self, "_link").encode(value))

    def __eq__(self, other):
        if type(other) is not Remote:
            return NotImplemented
        return _typed(_ask(self, "eq", other=object.__getattribute__(other, "_h")), (bool,), "==")

    def __ne__(self, other):
        eq = self.__eq__(other)
        return eq if eq is NotImplemented else not eq

    def __hash__(self):
        return hash(("remote", object.__getattribute__(self, "_h")))

    def __getitem__(self, key):
        return _ask(self, "getitem", arg=object.__getattribute__(self, "_link").encode(key))

    def __contains__(self, item):
        return _typed(_ask(self, "contains", arg=object.__getattribute__(self, "_link").encode(item)), (bool,), "in")

    def __instancecheck__(self, obj):
        return _typed(_ask(self, "isinstance", arg=object.__getattribute__(self, "_link").encode(obj)), (bool,),
                      "isinstance")

    def __iter__(self):
        return _ask(self, "iter")

    def __next__(self):
        return _ask(self, "next")

    def __bool__(self):
        return _typed(_ask(self, "bool"), (bool,), "bool")

    def __len__(self):
        return _typed(_ask(self, "len"), (int,), "len")

    def __str__(self):
        return _typed(_ask(self, "str"), (str,), "str")

    def __repr__(self):
        return _typed(_ask(self, "repr"), (str,), "repr")

def bind(names, link):
    """The tests' globals: the completion's names they use, as data or proxies, never in place of a builtin; a
    module (``import math``, ``import numpy as np``) is the tester's own import of that module, so patching it
    in the completion changes nothing here."""
    import builtins, importlib
    ns = {"__name__": "__sandbox__", "__builtins__": builtins}
    for name, value in names.items():
        if name.startswith("__") or name in vars(builtins):
            continue
        if type(value) is dict and list(value) == ["m"]:
            try:
                ns[name] = importlib.import_module(str(value["m"]))
            except Exception:  # not importable here: the tests fail on the name, as they would without it
                pass
            continue
        ns[name] = link.value({"v": value})
    return ns

def tester(job, tests, verdict_fd, req_fd, resp_fd, scratch):
    os.setpgid(0, 0)
    if not confine(job, verdict_fd, scratch):
        os._exit(0)
    if hasattr(sys, "set_int_max_str_digits"):
        sys.set_int_max_str_digits(0)
    link, me = Link(req_fd, resp_fd), os.getpid()
    try:
        code = compile(tests, "<tests>", "exec")
        first = link.ask({"op": "names", "h": None, "names": sorted(names_used(code))})
        if "error" in first:  # the completion's top-level code failed: it told its kind to the supervisor
            verdict = {"value": False} if first["error"] == "assert" else {"error": "peer"}
        else:
            exec(code, bind(first["names"] if isinstance(first.get("names"), dict) else {}, link))
            verdict = {"value": True}
    except AssertionError:
        verdict = {"value": False}
    except PeerFailed:
        verdict = {"error": "peer"}
    except BaseException as e:
        verdict = {"error": kind_of(e), "detail": ("%s: %s" % (type(e).__name__, e))[:500]}
    if os.getpid() != me:
        os._exit(0)
    if link.failed:  # a test that caught the failure does not turn it into a pass
        verdict = {"error": "peer"}
    os.write(verdict_fd, json.dumps(verdict).encode())
    os._exit(0)
'''
