// QMP events: a timestamped object sent to every monitor that finished negotiation.

export interface QmpEvent {
  event: string;
  data?: Record<string, unknown>;
  timestamp: { seconds: number; microseconds: number };
}

export function makeEvent(name: string, data?: Record<string, unknown>): QmpEvent {
  const nowUs = BigInt(Date.now()) * 1000n + (process.hrtime.bigint() / 1000n) % 1000n;
  const ev: QmpEvent = {
    event: name,
    timestamp: { seconds: Number(nowUs / 1_000_000n), microseconds: Number(nowUs % 1_000_000n) },
  };
  if (data !== undefined) ev.data = data;
  return ev;
}
