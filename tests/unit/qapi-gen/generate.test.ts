// Generator integrity: committed src/qapi/generated matches a fresh run; bad schemas fail loudly.
import assert from 'node:assert/strict';
import { mkdtempSync, readFileSync, rmSync, writeFileSync, readdirSync, mkdirSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { generate, loadSchema } from '../../../scripts/qapi-gen.js';

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../../..');

function fixture(defs: unknown[]): string {
  const dir = mkdtempSync(path.join(tmpdir(), 'qapi-gen-'));
  writeFileSync(path.join(dir, 'qapi-schema.json'), JSON.stringify([{ include: 'm.json' }]));
  writeFileSync(path.join(dir, 'm.json'), JSON.stringify(defs));
  return dir;
}

describe('qapi-gen', () => {
  it('committed src/qapi/generated is what npm run gen writes', () => {
    const out = mkdtempSync(path.join(tmpdir(), 'qapi-gen-out-'));
    try {
      const files = generate(path.join(root, 'schema'), out);
      for (const f of files) {
        assert.equal(readFileSync(path.join(out, f), 'utf8'), readFileSync(path.join(root, 'src/qapi/generated', f), 'utf8'), `${f} is stale: run npm run gen`);
      }
      assert.deepEqual(readdirSync(path.join(root, 'src/qapi/generated')).sort(), [...files].sort());
    } finally {
      rmSync(out, { recursive: true, force: true });
    }
  });
  const bad: [string, unknown[], RegExp][] = [
    ['unknown type', [{ struct: 'A', data: { x: 'Nope' } }], /unknown type 'Nope'/],
    ['duplicate name', [{ enum: 'A', data: ['x'] }, { struct: 'A', data: {} }], /'A' is already defined/],
    ['duplicate member via base', [{ struct: 'B', data: { x: 'str' } }, { struct: 'A', base: 'B', data: { x: 'int' } }], /member 'x' is defined twice/],
    ['branch not in enum', [{ enum: 'E', data: ['a'] }, { struct: 'S', data: {} }, { union: 'U', base: { t: 'E' }, discriminator: 't', data: { b: 'S' } }], /branch 'b' is not a value of E/],
    ['ambiguous alternate', [{ alternate: 'A', data: { a: 'str', b: 'str' } }], /ambiguous/],
    ['unknown key', [{ struct: 'A', data: {}, bogus: 1 }], /unknown key 'bogus'/],
    ['union without boxed', [{ enum: 'E', data: ['a'] }, { union: 'U', base: { t: 'E' }, discriminator: 't', data: {} }, { command: 'c', data: 'U' }], /need 'boxed'/],
  ];
  for (const [what, defs, re] of bad) {
    it(`fails loudly on ${what}`, () => {
      const dir = fixture(defs);
      try {
        assert.throws(() => loadSchema(dir), re);
      } finally {
        rmSync(dir, { recursive: true, force: true });
      }
    });
  }
  it('accepts a small valid schema', () => {
    const dir = fixture([{ enum: 'E', data: ['a', 'b'] }, { struct: 'S', data: { '*x': 'int' } },
      { union: 'U', base: { t: 'E' }, discriminator: 't', data: { a: 'S' } }, { command: 'c', data: 'U', boxed: true }]);
    const out = path.join(dir, 'out');
    mkdirSync(out);
    try {
      generate(dir, out);
      assert.match(readFileSync(path.join(out, 'types.ts'), 'utf8'), /export type U =\n {2}\| \(UBase & \{ "t": "a" \} & S\)\n {2}\| \(UBase & \{ "t": "b" \}\);/);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });
});
