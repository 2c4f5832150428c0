"""Checks the Kubernetes manifests under deploy/kubernetes without a cluster: every
document parses and has what its kind requires, every reference between them resolves
(selectors to pods, service and probe ports to container ports, the InferencePool to its
pods and its endpoint picker, routes to gateways and pools, bindings to roles and service
accounts), heddle's and sglang-router's flags are ones their `--help` lists, and the
metric names the endpoint picker is told to read are ones heddle exports.

Usage: check_deploy_manifests.py DIR HEDDLE_SERVE_HELP ROUTER_HELP METRICS_PAGE
(the last three are files holding `heddle serve --help`, `python -m
sglang_router.launch_router --help` and a heddle /metrics page). Prints what it checked;
exits non-zero with every problem found.
"""

import re
import sys
from pathlib import Path

import yaml

problems: list[str] = []


def need(condition: bool, message: str) -> None:
    if not condition:
        problems.append(message)


def dig(document: dict, path: str):
    value = document
    for key in path.split("."):
        if not isinstance(value, dict) or key not in value:
            return None
        value = value[key]
    return value


def flags_in(help_text: str) -> set[str]:
    return set(re.findall(r"(--[a-z][a-z0-9-]*)", help_text))


def flag_name(arg: str) -> str | None:
    if not arg.startswith("--"):
        return None
    return arg.split("=", 1)[0]


def main() -> None:
    folder, heddle_help, router_help, metrics_page = (Path(a) for a in sys.argv[1:5])
    heddle_flags = flags_in(heddle_help.read_text())
    router_flags = flags_in(router_help.read_text())
    exported = set(re.findall(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)[{ ]", metrics_page.read_text(), re.M))
    need("--served-model-name" in heddle_flags, "heddle serve --help lists no --served-model-name")

    documents = []
    for path in sorted(folder.glob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text()):
            if document is None:
                continue
            where = f"{path.name}: {document.get('kind')} {dig(document, 'metadata.name')}"
            for field in ("apiVersion", "kind", "metadata.name"):
                need(dig(document, field) is not None, f"{where}: no {field}")
            documents.append((where, document))
    need(len(documents) > 0, f"no manifests in {folder}")

    def of_kind(kind: str):
        return [(w, d) for w, d in documents if d.get("kind") == kind]

    def named(kind: str, name: str):
        return next((d for _, d in of_kind(kind) if dig(d, "metadata.name") == name), None)

    # Deployments: their selector picks their own pods, probes use declared ports.
    pods = []  # (labels, containers)
    for where, deployment in of_kind("Deployment"):
        need(deployment["apiVersion"] == "apps/v1", f"{where}: apiVersion")
        selector = dig(deployment, "spec.selector.matchLabels") or {}
        labels = dig(deployment, "spec.template.metadata.labels") or {}
        need(bool(selector), f"{where}: no spec.selector.matchLabels")
        need(selector.items() <= labels.items(), f"{where}: selector {selector} misses its pods {labels}")
        containers = dig(deployment, "spec.template.spec.containers") or []
        need(len(containers) > 0, f"{where}: no containers")
        account = dig(deployment, "spec.template.spec.serviceAccountName")
        if account:
            need(named("ServiceAccount", account) is not None, f"{where}: no ServiceAccount {account}")
        for container in containers:
            need(bool(container.get("name")) and bool(container.get("image")), f"{where}: a container without name or image")
            ports = container.get("ports", [])
            port_names = {p.get("name") for p in ports}
            port_numbers = {p.get("containerPort") for p in ports}
            for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
                spec = container.get(probe)
                if spec is None:
                    continue
                port = dig(spec, "httpGet.port") or dig(spec, "grpc.port")
                need(port in port_names or port in port_numbers, f"{where}: {probe} port {port} is not a container port")
            command = " ".join(container.get("command", []))
            args = container.get("args", [])
            if command == "heddle":
                need(args[:1] == ["serve"], f"{where}: heddle runs `serve`")
                known = heddle_flags
            elif "sglang_router.launch_router" in command:
                known = router_flags
            else:
                known = None
            for arg in args:
                name = flag_name(arg)
                if known is not None and name:
                    need(name in known, f"{where}: {container['name']} has no flag {name}")
                if name and name.endswith("-metric"):
                    metric = arg.split("=", 1)[1]
                    need(metric in exported, f"{where}: {name} names {metric}, which heddle does not export")
        pods.append((labels, containers))

    def pods_selected(selector: dict):
        return [c for labels, c in pods if selector and selector.items() <= labels.items()]

    def container_ports(containers) -> set:
        return {v for c in containers for p in c.get("ports", []) for v in (p.get("name"), p.get("containerPort"))}

    for where, service in of_kind("Service"):
        selected = pods_selected(dig(service, "spec.selector") or {})
        need(len(selected) > 0, f"{where}: its selector picks no pods")
        for port in dig(service, "spec.ports") or []:
            target = port.get("targetPort", port.get("port"))
            need(any(target in container_ports(c) for c in selected), f"{where}: targetPort {target} is no container port of its pods")

    pools = of_kind("InferencePool")
    for where, pool in pools:
        need(pool["apiVersion"] == "inference.networking.k8s.io/v1", f"{where}: apiVersion")
        selected = pods_selected(dig(pool, "spec.selector.matchLabels") or {})
        need(len(selected) > 0, f"{where}: its selector picks no pods")
        for target in dig(pool, "spec.targetPorts") or []:
            need(any(target.get("number") in container_ports(c) for c in selected), f"{where}: target port {target} is no container port of its pods")
        picker = dig(pool, "spec.endpointPickerRef") or {}
        service = named("Service", picker.get("name"))
        need(service is not None, f"{where}: no Service {picker.get('name')} for the endpoint picker")
        if service is not None:
            numbers = {p.get("port") for p in dig(service, "spec.ports") or []}
            need(dig(picker, "port.number") in numbers, f"{where}: the endpoint picker's port is not its Service's")
        need(picker.get("failureMode") in (None, "FailOpen", "FailClose"), f"{where}: failureMode")
        for _, deployment in of_kind("Deployment"):
            for container in dig(deployment, "spec.template.spec.containers") or []:
                args = container.get("args", [])
                if "--pool-name=" + dig(pool, "metadata.name") in args:
                    need("--pool-group=inference.networking.k8s.io" in args, f"{where}: its endpoint picker watches another API group")

    for where, route in of_kind("HTTPRoute"):
        for parent in dig(route, "spec.parentRefs") or []:
            need(named(parent.get("kind", "Gateway"), parent["name"]) is not None, f"{where}: no {parent.get('kind', 'Gateway')} {parent['name']}")
        for rule in dig(route, "spec.rules") or []:
            for backend in rule.get("backendRefs", []):
                kind = backend.get("kind", "Service")
                if kind == "InferencePool":
                    need(backend.get("group") == "inference.networking.k8s.io", f"{where}: InferencePool group")
                need(named(kind, backend["name"]) is not None, f"{where}: no {kind} {backend['name']}")

    for where, gateway in of_kind("Gateway"):
        need(bool(dig(gateway, "spec.gatewayClassName")), f"{where}: no gatewayClassName")
        need(len(dig(gateway, "spec.listeners") or []) > 0, f"{where}: no listeners")

    for where, binding in of_kind("RoleBinding"):
        role = dig(binding, "roleRef.name")
        need(named(dig(binding, "roleRef.kind"), role) is not None, f"{where}: no role {role}")
        for subject in binding.get("subjects", []):
            need(named(subject["kind"], subject["name"]) is not None, f"{where}: no {subject['kind']} {subject['name']}")

    for problem in problems:
        print("PROBLEM:", problem)
    print(f"checked {len(documents)} documents: {', '.join(sorted({d['kind'] for _, d in documents}))}")
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
