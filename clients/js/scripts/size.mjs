// Prints the browser bundle size of the package (minified with esbuild, then gzipped).
import { build } from "esbuild";
import { gzipSync } from "node:zlib";

const out = await build({
  entryPoints: [new URL("../src/index.ts", import.meta.url).pathname],
  bundle: true,
  minify: true,
  format: "esm",
  platform: "browser",
  target: "es2020",
  write: false,
});
const code = out.outputFiles[0].contents;
const gz = gzipSync(code, { level: 9 });
const fmt = (n) => `${(n / 1024).toFixed(1)} KiB`;
console.log(`browser bundle: ${fmt(code.length)} minified, ${fmt(gz.length)} minified+gzipped (${gz.length} bytes)`);
