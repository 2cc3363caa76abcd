"""Who may publish and subscribe what on a secured deployment's NATS: one user per identity (a process
of the topology, or the operator), mapped from its client certificate (nats-server's verify_and_map).

The subjects are the request plane's (workers/runtime/requestplane.py) and the KV router's
(workers/kv_router/events.py); each process gets exactly what its kind does:
- a server of `<ns>.<component>.<endpoint>` subscribes there (and to its per-instance and cancel
  subjects below it) and publishes replies to callers' inboxes;
- a caller publishes requests and cancels to the components it calls, and reads replies only on its
  own inbox prefix (`_INBOX.<identity>`: nobody reads another identity's replies); a router hands each
  request off to a worker, which answers the caller directly, so the frontend may also cancel streams on
  the routers' workers' per-instance cancel subjects (never send them requests);
- KV workers publish KV events and load and hear resync requests; routers hear events and ask for resyncs,
  and tell each other the requests they send (workers/kv_router/peers.py); a worker reports a request's
  end to the router's own inbox (a reply subject, as any answer).
So a worker cannot send generation requests to other workers, the frontend cannot publish KV events,
and no identity can read the prompts or answers of another's streams.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from launcher.credentials import OPERATOR, identity_name
from launcher.resolve import ResolvedProcess
from workers.kinds import KINDS, entry_kinds
from workers.kv_router.peers import routed_subject
from workers.runtime.settings import subject_token
from workers.runtime.tls import inbox_prefix

REPLIES = "_INBOX.>"


@dataclass
class Access:
    identity: str
    publish: list[str] = field(default_factory=list)
    subscribe: list[str] = field(default_factory=list)

    def add(self, publish: Iterable[str] = (), subscribe: Iterable[str] = ()) -> None:
        self.publish += [s for s in publish if s not in self.publish]
        self.subscribe += [s for s in subscribe if s not in self.subscribe]


def _serves(ns: str, component: str, endpoint: str) -> list[str]:
    base = ".".join(subject_token(p) for p in (ns, component, endpoint))
    return [base, f"{base}.>"]


def _flag(proc: ResolvedProcess, name: str, default: str) -> str:
    setting = proc.flags.get(name)
    return str(setting.value) if setting is not None and setting.value is not None else default


def component_of(proc: ResolvedProcess) -> str:
    return _flag(proc, "component", KINDS[proc.kind].component)


def access_for(namespace: str, processes: list[ResolvedProcess]) -> list[Access]:
    """Every identity's permissions: one per process, then the operator."""
    ns = subject_token(namespace)
    entry = {k.name for k in entry_kinds()}
    entry_components = sorted({component_of(p) for p in processes if p.kind in entry})
    all_components = sorted({(component_of(p), KINDS[p.kind].endpoint) for p in processes
                             if KINDS[p.kind].endpoints})
    routed_components = sorted({_flag(p, "worker-component", KINDS["kv_worker"].component) for p in processes
                                if p.kind == "router"})
    out = []
    for proc in processes:
        kind = KINDS[proc.kind]
        acc = Access(proc.name, subscribe=[f"{inbox_prefix(proc.name)}.>"])
        if proc.kind == "frontend":
            for comp in entry_components:
                acc.add(publish=_serves(ns, comp, "generate"))
            for comp in routed_components:
                acc.add(publish=[f"{_serves(ns, comp, 'generate')[0]}.*.cancel"])
        else:
            for endpoint in kind.endpoints:
                acc.add(subscribe=_serves(ns, component_of(proc), endpoint))
            acc.add(publish=[REPLIES])
        if proc.kind == "kv_worker":
            acc.add(publish=[f"{ns}.kv_events", f"{ns}.kv_load"], subscribe=[f"{ns}.kv_resync.*"])
        if proc.kind == "router":
            acc.add(subscribe=[f"{ns}.kv_events", f"{ns}.kv_load", routed_subject(namespace)],
                    publish=[f"{ns}.kv_resync.*", routed_subject(namespace)])
            acc.add(publish=_serves(ns, _flag(proc, "worker-component", KINDS["kv_worker"].component), "generate"))
        if proc.kind == "decode":
            acc.add(publish=_serves(ns, _flag(proc, "prefill-component", KINDS["prefill"].component), "generate"))
        out.append(acc)
    operator = Access(OPERATOR, subscribe=[f"{inbox_prefix(OPERATOR)}.>"])
    for comp, endpoint in all_components:  # the seed client may call any component, as without security
        operator.add(publish=_serves(ns, comp, endpoint))
    out.append(operator)
    return out


def server_config(listen: str, store: Path, tls: dict[str, str], deployment: str, access: list[Access]) -> str:
    """nats-server's configuration (its format reads JSON): TLS with verified client certificates, each
    mapped to its identity's user and permissions. Holds file paths, never keys."""
    users = [{"user": identity_name(deployment, a.identity),
              "permissions": {"publish": {"allow": a.publish or ["_no_publish_"]},
                              "subscribe": {"allow": a.subscribe}}} for a in access]
    conf = {
        "listen": listen,
        "jetstream": {"store_dir": str(store)},
        "tls": {**tls, "verify_and_map": True, "timeout": 5},
        "authorization": {"users": users},
    }
    return json.dumps(conf, indent=1)
