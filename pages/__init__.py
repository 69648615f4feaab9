"""NiceGUI page builders; they show services and hold no training or model logic."""
