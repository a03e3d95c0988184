"""What the operator documentation tells people to run: kubectl commands that find the
objects deploy/k8s makes (namespace, every pod), and a `make help` that lists the targets
and says how long `make bench` may take.

No cluster, no network: the commands are read, not run.
"""

from __future__ import annotations

import inspect
import re
import shlex

import yaml

from loadtest.bench import main as bench_main
from tests.deploy.helpers import DEPLOY, K8S, ROOT, one, render, run

# kubectl subcommands that do not act on an object of the namespace.
_CLUSTER_WIDE = ("kustomize", "apply -f -", "create namespace", "get --raw", "version")


def kubectl_commands(text: str) -> list[str]:
    """Every kubectl invocation in a Markdown text (inline code and fenced blocks), with
    line continuations joined and pipes split."""
    code = re.findall(r"```[a-z]*\n(.*?)```", text, flags=re.S)
    code += re.findall(r"`([^`\n]*(?:\n[^`\n]*){0,3})`", re.sub(r"```.*?```", "", text, flags=re.S))
    commands = []
    for block in code:
        block = re.sub(r"\\\n\s*", " ", block)
        block = re.sub(r"\s*\n\s*", " ", block)
        for part in re.split(r"\||;|&&", block):
            found = re.search(r"\bkubectl\s.*", part)
            if found:
                commands.append(found.group(0).split("#")[0].strip())
    return commands


def base_namespace() -> str:
    return str(yaml.safe_load((K8S / "base" / "kustomization.yaml").read_text())["namespace"])


def test_kubectl_commands_in_the_runbooks_name_the_namespace() -> None:
    """deploy/k8s puts everything in its own namespace: a command without `-n` looks in
    the context's (usually `default`) and finds nothing."""
    namespace = base_namespace()
    commands = kubectl_commands((DEPLOY / "README.md").read_text())
    assert len(commands) > 5, commands
    missing = [
        c for c in commands
        if len(c.split()) > 2  # a command, not a name in prose ("kubectl port-forward")
        and not any(re.match(rf"kubectl\s+{re.escape(w)}(?:\s|$)", c) for w in _CLUSTER_WIDE)
        and not re.search(rf"(?:-n|--namespace)[ =]{namespace}\b", c)
    ]  # fmt: skip
    assert not missing, f"kubectl commands without -n {namespace}: {missing}"


def test_a_reload_reaches_every_pod() -> None:
    """Each replica loads its own models: `kubectl exec deploy/…` signals one pod only, so
    the others keep the old version."""
    commands = kubectl_commands((DEPLOY / "README.md").read_text())
    signals = [c for c in commands if re.search(r"\bkill\b", c)]
    assert signals, "deploy/README.md no longer says how to SIGHUP the pods"
    for command in signals:
        words = shlex.split(command)
        target = next(w for w in words[words.index("exec") + 1 :] if not w.startswith("-"))
        assert not target.startswith(("deploy/", "deployment/")), command


def test_the_reload_selector_matches_the_pods() -> None:
    """The label selector the reload command lists pods with selects the Deployment's pods."""
    commands = kubectl_commands((DEPLOY / "README.md").read_text())
    listing = [c for c in commands if re.match(r"kubectl\s.*\bget pods\b", c)]
    assert listing
    template = one(render("cpu"), "Deployment", "inference")["spec"]["template"]
    labels = template["metadata"]["labels"]
    for command in listing:
        selector = re.search(r"-l\s+(\S+)", command)
        assert selector, command
        wanted = dict(pair.split("=", 1) for pair in selector.group(1).split(","))
        assert wanted.items() <= labels.items(), (wanted, labels)


def make_help() -> str:
    result = run(["make", "-s", "-C", str(ROOT), "help"])
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_make_help_lists_every_target() -> None:
    phony = re.search(r"^\.PHONY:(.*)$", (ROOT / "Makefile").read_text(), flags=re.M)
    assert phony
    listed = set(re.findall(r"\bmake ([a-z][a-z-]*)", make_help()))
    missing = set(phony.group(1).split()) - listed - {"help", "setup"}
    assert not missing, f"make help does not list: {sorted(missing)}"


def test_make_help_gives_bench_its_whole_budget() -> None:
    """`make bench` runs until loadtest.bench's --max-minutes is spent (the recorded run in
    docs/benchmarks.md took 16.6 min): the help must not promise less."""
    budget = inspect.signature(bench_main).parameters["max_minutes"].default
    line = next(x for x in make_help().splitlines() if x.startswith("make bench"))
    minutes = [float(m) for m in re.findall(r"(\d+(?:\.\d+)?)\s*min", line)]
    assert minutes and max(minutes) >= budget, (line, budget)
    recorded = re.search(r"Run \S+ in ([\d.]+) min", (ROOT / "docs" / "benchmarks.md").read_text())
    assert recorded and float(recorded.group(1)) <= max(minutes), line


def test_image_tools_refreshes_the_package_lists() -> None:
    """On a fresh Debian/Ubuntu image the apt lists are empty: install without `apt-get
    update` fails with "Unable to locate package"."""
    makefile = (ROOT / "Makefile").read_text()
    for target in ("image-tools", "deploy-tools", "data"):
        recipe = re.search(rf"^{target}:.*\n((?:\t.*\n)+)", makefile, flags=re.M)
        assert recipe, target
        body = recipe.group(1)
        if "apt-get install" in body:
            update = body.find("apt-get update")
            assert 0 <= update < body.index("apt-get install"), f"{target}: no apt-get update"
