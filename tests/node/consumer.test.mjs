// A non-Python consumer: decodes every golden with @msgpack/msgpack, compares it with the
// golden's wire form, and validates the wire form against the derived wire schema with Ajv.
import { test } from "node:test";
import assert from "node:assert/strict";
import { readFileSync, readdirSync } from "node:fs";
import { join, dirname } from "node:path";
import { fileURLToPath } from "node:url";
import { decode } from "@msgpack/msgpack";
import Ajv2020 from "ajv/dist/2020.js";
import { Parser } from "@asyncapi/parser";

const here = dirname(fileURLToPath(import.meta.url));
const goldens = join(here, "..", "goldens");
const schemaDir = join(here, "..", "..", "schema");

// Exact big integers: JSON.parse's source text for integers beyond 2^53.
const parseExact = (text) =>
  JSON.parse(text, (key, value, context) =>
    typeof value === "number" && Number.isInteger(value) && !Number.isSafeInteger(value)
      ? BigInt(context.source)
      : value);

const hex = (bytes) => Buffer.from(bytes).toString("hex");
const fromHex = (h) => Uint8Array.from(Buffer.from(h, "hex"));

// msgpack values to the goldens' JSON form: bin as {"$bytes": hex}, safe BigInts as numbers.
function plain(value) {
  if (value instanceof Uint8Array) return { $bytes: hex(value) };
  if (typeof value === "bigint") return Number.isSafeInteger(Number(value)) && BigInt(Number(value)) === value ? Number(value) : value;
  if (Array.isArray(value)) return value.map(plain);
  if (value !== null && typeof value === "object") return Object.fromEntries(Object.entries(value).map(([k, v]) => [k, plain(v)]));
  return value;
}

const files = (sub) => readdirSync(join(goldens, sub)).filter((f) => f.endsWith(".json")).sort();
const read = (sub, f) => readFileSync(join(goldens, sub, f), "utf8");

const wireSchema = JSON.parse(readFileSync(join(schemaDir, "derived", "wire.schema.json"), "utf8"));
const ajv = new Ajv2020({ strict: false, allErrors: true });
ajv.addSchema(wireSchema);
const validatorFor = (dialect) => ajv.getSchema(`urn:kvevents:schema:wire#/$defs/${dialect}.EventBatch`);

// Values a dialect's producer never sends (kvevents.encode passes them through).
const outside = new Set(["stored_bigram_tokens.json/vllm", "stored_bigram_tokens.json/legacy",
  "stored_bytes_hash.json/sglang", "stored_bytes_hash.json/legacy"]);

test("there are goldens to read", () => {
  assert.ok(files("cases").length >= 10);
});

for (const file of files("cases")) {
  const golden = parseExact(read("cases", file));
  const lossy = JSON.parse(read("cases", file));
  for (const [dialect, form] of Object.entries(golden.dialects)) {
    test(`${file} ${dialect}: msgpack decodes to the golden wire form`, () => {
      const decoded = plain(decode(fromHex(form.hex), { useBigInt64: true }));
      assert.deepStrictEqual(decoded, form.wire);
    });
    test(`${file} ${dialect}: wire form ${outside.has(`${file}/${dialect}`) ? "is outside" : "fits"} the wire schema`, () => {
      const validate = validatorFor(dialect);
      assert.ok(validate, `no schema for ${dialect}`);
      const ok = validate(lossy.dialects[dialect].wire);
      assert.equal(ok, !outside.has(`${file}/${dialect}`), JSON.stringify(validate.errors));
    });
  }
}

for (const file of files("decode")) {
  test(`decode/${file}: msgpack decodes to its wire form`, () => {
    const golden = parseExact(read("decode", file));
    assert.deepStrictEqual(plain(decode(fromHex(golden.hex), { useBigInt64: true })), golden.wire);
  });
}

test("frames: END marker and seq frames", () => {
  const end = JSON.parse(read("frames", "replay_end_with_topic.json")).frames;
  assert.deepStrictEqual(end.slice(1), ["", "", "ffffffffffffffff", ""]);
  const live = JSON.parse(read("frames", "live.json")).frames;
  assert.equal(live.length, 3);
  assert.equal(Buffer.from(live[1], "hex").readBigUInt64BE(), 2n);
  for (const v of JSON.parse(read("frames", "start_seq_rules.json")).vectors) {
    const bytes = Buffer.from(v.hex, "hex");
    const start = bytes.length > 8 ? null : bytes.length === 0 ? 0 : Number(BigInt("0x" + v.hex));
    assert.equal(start, v.start);
  }
});

test("the AsyncAPI document parses as valid AsyncAPI 3.0", async () => {
  const parser = new Parser();
  const { document, diagnostics } = await parser.parse(readFileSync(join(schemaDir, "kvevents.asyncapi.json"), "utf8"));
  const errors = diagnostics.filter((d) => d.severity === 0);
  assert.deepStrictEqual(errors.map((d) => d.message), []);
  assert.ok(document);
  assert.equal(document.version(), "3.0.0");
});
