// Validate custom resources against the OpenAPI schemas of their CRDs, offline.
//
// Usage: node validate.mjs NODE_MODULES_DIR < documents.json
// stdin: a JSON array of Kubernetes objects. stdout: a JSON array, one entry per object:
//   {"index": i, "kind": K, "ok": true} or {"index": i, "kind": K, "ok": false, "error": "..."}
// The schemas are the CRDs' own (prometheus-operator, KEDA), compiled by kubernetes-models.
// They check types, enums, required fields and formats; like the CRDs they do not reject unknown
// fields, which tests/test_helm.py checks separately. Exit status 0 unless the input is unusable.
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { pathToFileURL } from "node:url";

const PACKAGES = {
  "monitoring.coreos.com": "@kubernetes-models/prometheus-operator",
  "keda.sh": "@kubernetes-models/keda",
};

const modulesDir = process.argv[2];
if (!modulesDir) {
  process.stderr.write("usage: node validate.mjs NODE_MODULES_DIR < documents.json\n");
  process.exit(2);
}
const docs = JSON.parse(readFileSync(0, "utf8"));
const results = [];
for (const [index, doc] of docs.entries()) {
  const [group, version] = String(doc.apiVersion).split("/");
  const pkg = PACKAGES[group];
  if (!pkg || !version) {
    results.push({ index, kind: doc.kind, ok: false, error: `no schema for ${doc.apiVersion}` });
    continue;
  }
  const file = join(modulesDir, pkg, group, version, `${doc.kind}.js`);
  let Model;
  try {
    Model = (await import(pathToFileURL(file).href))[doc.kind];
  } catch (err) {
    results.push({ index, kind: doc.kind, ok: false, error: `no schema for ${doc.apiVersion} ${doc.kind}: ${err.message}` });
    continue;
  }
  try {
    new Model(doc).validate();
    results.push({ index, kind: doc.kind, ok: true });
  } catch (err) {
    results.push({ index, kind: doc.kind, ok: false, error: err.message });
  }
}
process.stdout.write(JSON.stringify(results) + "\n");
