// Loader hook: compiles the extensionless TypeScript iotests (001, 002, …), which tsx skips.
// Used as `node --import tsx --import ./tests/iotests/ts-loader.mjs tests/iotests/NNN`; tsx
// still resolves './common.js' to common.ts. Registered last, so this hook runs first.
import { register } from 'node:module';
import { isMainThread } from 'node:worker_threads';
import { readFile } from 'node:fs/promises';
import { fileURLToPath } from 'node:url';
import { basename } from 'node:path';

if (isMainThread) register(import.meta.url);

/** A test file: a three-digit name in any directory (QEMU's iotests naming). */
const TEST_NAME = /^[0-9]{3}$/;

let transformer;
/** esbuild (tsx's own compiler) when present; TypeScript's transpiler otherwise. */
async function getTransformer() {
  if (transformer) return transformer;
  try {
    const esbuild = await import('esbuild');
    transformer = (code, file) =>
      esbuild.transformSync(code, {
        loader: 'ts', format: 'esm', target: 'node20', sourcefile: file, sourcemap: 'inline',
      }).code;
  } catch {
    const ts = (await import('typescript')).default;
    transformer = (code, file) =>
      ts.transpileModule(code, {
        fileName: file,
        compilerOptions: { module: ts.ModuleKind.ESNext, target: ts.ScriptTarget.ES2022, inlineSourceMap: true },
      }).outputText;
  }
  return transformer;
}

export async function load(url, context, nextLoad) {
  if (url.startsWith('file:')) {
    const file = fileURLToPath(url);
    if (TEST_NAME.test(basename(file))) {
      const code = await readFile(file, 'utf8');
      const transform = await getTransformer();
      return { format: 'module', source: transform(code, file), shortCircuit: true };
    }
  }
  return nextLoad(url, context);
}
