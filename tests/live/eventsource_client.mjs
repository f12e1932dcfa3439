// Reads one run's attach stream with the npm `eventsource` package — a WHATWG EventSource that
// nobody on this project wrote — and prints every event it dispatches as one JSON line:
// {"event", "id", "data", "value", "error"}, where `data` is the event's data exactly as the
// EventSource delivered it and `value` is that data decoded the way the attach protocol
// documents (every event's data is one line of JSON); `error` says why decoding failed.
// Exits 0 after the end event, 2 when none arrives in time.
//
// usage: node eventsource_client.mjs PACKAGES_DIR URL
//   PACKAGES_DIR: the folder whose node_modules holds `eventsource` (scripts/test.sh installs it)
import { createRequire } from 'node:module';
import { join } from 'node:path';

const [packages, url] = process.argv.slice(2);
if (!packages || !url) {
  console.error('usage: node eventsource_client.mjs PACKAGES_DIR URL');
  process.exit(64);
}
const { EventSource } = createRequire(join(packages, 'resolve-from-here.js'))('eventsource');

const KINDS = ['message', 'chunk', 'reset', 'done', 'failed', 'cancelled', 'unavailable', 'reconnect'];
const END = new Set(['done', 'failed', 'cancelled']);

const timer = setTimeout(() => {
  console.error('no end event within 60 s');
  process.exit(2);
}, 60_000);
const source = new EventSource(url);
for (const kind of KINDS) {
  source.addEventListener(kind, (e) => {
    let value = null;
    let error = null;
    try {
      value = JSON.parse(e.data);
    } catch (err) {
      error = String(err);
    }
    process.stdout.write(
      JSON.stringify({ event: e.type, id: e.lastEventId, data: e.data, value, error }) + '\n',
    );
    if (END.has(kind)) {
      source.close();
      clearTimeout(timer);
    }
  });
}
// the EventSource reconnects by itself after an error; say so on stderr for the test's message
source.onerror = (e) => console.error(`eventsource error: ${e.message ?? e.type}`);
